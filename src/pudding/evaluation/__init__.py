"""Stage 5, evaluation: zero-shot accuracy, the reproduction tables, the benchmarks and the lm-eval plugin."""
