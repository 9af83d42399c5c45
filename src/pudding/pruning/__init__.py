"""Stage 1, pruning: the greedy searches and the static and merge baselines, each writing a pool or a
checkpoint."""
