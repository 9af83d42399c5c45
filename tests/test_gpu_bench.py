"""benchmarks/gpu_bench.py on the CPU: its dry run, its refusals, and the pieces its ratios rest on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import gpu_bench  # noqa: E402

TINY_SHAPE = {"description": "tiny llama", "k": 2, "n_sets": 4,
              "config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
                         "max_position_embeddings": 256, "tie_word_embeddings": True}}
TINY_ROUTER = {"description": "tiny bert", "config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 64}}


@pytest.fixture
def files(tmp_path):
    shape, router, prompts = tmp_path / "tiny.json", tmp_path / "tiny-router.json", tmp_path / "prompts.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    router.write_text(json.dumps(TINY_ROUTER))
    prompts.write_text(json.dumps({str(n): {"ids": [(7 * i) % 300 + 3 for i in range(n)], "text": "word " * n}
                                   for n in (128, 160)}))
    return shape, router, prompts


def _args(files, tmp_path, *extra):
    shape, router, prompts = files
    return ["--shape", str(shape), "--router-shapes", str(router), "--prompts", str(prompts), "--device", "cpu",
            "--dtype", "float32", "--rounds", "2", "--new-tokens", "2", "--lengths", "160", "--prefill-batch", "2",
            "--out", str(tmp_path / "out.json"), *extra]


def test_dry_run_times_every_variant_interleaved_and_checks_omission_exactly(files, tmp_path, capsys):
    assert gpu_bench.main(_args(files, tmp_path)) == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["weights"] == "random" and report["total_blocks"] == 6
    static = report["static_set"]
    assert len(static) == 2 and 0 not in static and 5 not in static
    assert report["compute_limit"] == pytest.approx(6 / 4)
    # omission against the same model pruned for good: identical logits and greedy tokens
    assert report["omission_check"]["none"] == {"max_abs_logit_difference": 0.0, "greedy_tokens_equal": True,
                                                "tokens": gpu_bench.CHECK_TOKENS}
    timings = report["timings"]
    assert set(timings["decode_seconds"]) == {f"none/{v}" for v in gpu_bench.VARIANTS}
    assert all(len(v) == 2 for v in timings["decode_seconds"].values())  # one per round
    assert set(timings["prefill_seconds"]["none/dense"]) == {"128", "160"}  # the route length is always timed
    # each ratio is taken within a round, then summarized over the rounds
    batched = timings["batched_prefill_seconds"]
    per_round = sorted(d / s for d, s in zip(batched["none/dense"], batched["none/static"]))
    ratio = report["ratios"]["none"]["dense_over_static_batched_prefill"]
    assert (ratio["min"], ratio["max"]) == pytest.approx((per_round[0], per_round[-1]))
    assert set(report["router_alone"]) == {str(files[1])}
    assert "router" in capsys.readouterr().out


def test_a_ratio_beyond_the_compute_limit_is_flagged():
    def summary(value):
        return {"median": value, "q1": value, "q3": value, "min": value, "max": value, "n": 1}

    names = [f"none/{v}" for v in gpu_bench.VARIANTS]
    timings = {"prefill_seconds": {n: {"128": [1.0]} for n in names},
               "prefill_model_seconds": {n: {"128": [1.0]} for n in names},
               "batched_prefill_seconds": {n: [1.0] for n in names},
               "decode_seconds": {n: [1.0] for n in names}}
    timings["batched_prefill_seconds"]["none/dense"] = [2.0]  # 2x from skipping 1 of 4 blocks: impossible
    ratios = gpu_bench.precision_ratios(timings, "none", limit=4 / 3)
    assert ratios["dense_over_static_batched_prefill"] == summary(2.0)
    assert any("dense_over_static_batched_prefill" in e for e in ratios["measurement_errors"])
    timings["batched_prefill_seconds"]["none/dense"] = [1.2]
    assert gpu_bench.precision_ratios(timings, "none", limit=4 / 3)["measurement_errors"] == []


def test_random_sets_are_distinct_and_keep_the_first_and_last_block():
    sets = gpu_bench.random_sets(32, 7, 10, seed=3)
    assert len(set(sets)) == 10 and all(len(s) == 7 and min(s) >= 1 and max(s) <= 30 for s in sets)
    assert sets == gpu_bench.random_sets(32, 7, 10, seed=3)
    with pytest.raises(gpu_bench.ConfigError, match="k=31"):
        gpu_bench.random_sets(32, 31, 2)


def test_shipped_shapes_are_real_architectures():
    from transformers import AutoConfig

    for name in ("llama-3.1-8b", "smollm2-135m", "minilm-l6", "bert-base"):
        shape = gpu_bench.read_shape(name)
        config = AutoConfig.for_model(**shape["config"])
        assert config.num_hidden_layers > 0 and shape["description"]
    llama = AutoConfig.for_model(**gpu_bench.read_shape("llama-3.1-8b")["config"])
    assert (llama.num_hidden_layers, llama.hidden_size, llama.vocab_size) == (32, 4096, 128256)


def test_bad_input_gets_a_one_line_error(files, tmp_path, capsys):
    assert gpu_bench.main(_args(files, tmp_path, "--shape", "no-such-shape")) == 2
    assert "unknown shape 'no-such-shape'" in capsys.readouterr().err
    assert gpu_bench.main(_args(files, tmp_path, "--lengths", "999")) == 2
    assert "no prompt of [999] tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_bench.main(_args(files, tmp_path, "--quantize", "int8-weight-only"))  # must start with none
    assert "starts with none" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_bench.main(_args(files, tmp_path, "--quantize", "none,int4"))
    assert not (tmp_path / "out.json").exists()
