"""`pudding candidates` / `pudding baselines` on a tiny model: the artifact, dedup, resume and bad input."""

from __future__ import annotations

import json

import pytest

from pudding.cli import main
from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.load import load_config
from pudding.pool.artifact import CandidatePool, SetSource, deduplicate, shrink_pool
from pudding.pruning.candidates import PoolConfig, build_baselines, build_pool

from tiny import NUM_LAYERS, tiny_model


def _config(tiny_dir, tmp_path, **overrides):
    settings = dict(model=tiny_dir, tasks=("piqa", "arc_easy"), objectives=("tl", "margin"), k=2, samples=4,
                    run_dir=str(tmp_path / "run"), out=str(tmp_path / "pool"), progress=False)
    return PoolConfig(**{**settings, **overrides})


def test_pool_artifact_records_sets_sources_and_fingerprint(tiny_dir, tmp_path):
    pool = build_pool(_config(tiny_dir, tmp_path))
    data = json.loads((tmp_path / "pool" / "pool.json").read_text())
    assert data["format"] == "pudding.pool/1" and data["provenance"]["git"]["commit"]
    assert data["model"]["fingerprint"]["num_blocks"] == NUM_LAYERS
    sources = [s for entry in data["sets"] for s in entry["sources"]]
    assert sorted((s["task"], s["objective"]) for s in sources) == sorted(
        (t, o) for t in ("piqa", "arc_easy") for o in ("tl", "margin"))
    for entry in data["sets"]:
        assert len(entry["blocks"]) == 2 and not {0, NUM_LAYERS - 1} & set(entry["blocks"])
        for source in entry["sources"]:
            assert sorted(source["removal_order"]) == entry["blocks"]
            assert len(source["trajectory"]) == 3 and len(source["sample_ids"]) == 4 and source["seconds"] >= 0
    assert len({tuple(e["blocks"]) for e in data["sets"]}) == len(data["sets"])
    loaded = CandidatePool.from_pretrained(tmp_path / "pool")
    assert loaded.sets == pool.sets
    loaded.check_model(load_config(tiny_dir))
    other = tmp_path / "other"
    tiny_model("llama", num_hidden_layers=8).save_pretrained(other)
    with pytest.raises(ConfigError, match="built for"):
        loaded.check_model(load_config(str(other)))


def test_rerun_resumes_from_checkpoints_and_gives_the_same_pool(tiny_dir, tmp_path):
    first = build_pool(_config(tiny_dir, tmp_path))
    checkpoints = sorted((tmp_path / "run").glob("*.json"))
    assert len(checkpoints) == 4
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    second = build_pool(_config(tiny_dir, tmp_path))
    assert [e.blocks for e in second.sets] == [e.blocks for e in first.sets]
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps, "finished searches must not be recomputed"


def test_checkpoint_from_another_configuration_is_refused(tiny_dir, tmp_path):
    build_pool(_config(tiny_dir, tmp_path, tasks=("piqa",), objectives=("tl",)))
    with pytest.raises(ConfigError, match="differs in: samples_sha256"):
        build_pool(_config(tiny_dir, tmp_path, tasks=("piqa",), objectives=("tl",), samples=5))


def test_deduplicate_merges_sources_of_identical_sets():
    source = lambda task: SetSource("greedy", task, "tl", [], [], [], 0.0)  # noqa: E731
    entries = deduplicate([((3, 1), source("a")), ((1, 3), source("b")), ((2, 4), source("c"))])
    assert [e.blocks for e in entries] == [(1, 3), (2, 4)]
    assert [s.task for s in entries[0].sources] == ["a", "b"]


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(k=4), ConfigError, "below the 4 removable"),
        (dict(tasks=("copa",), samples=100), ConfigError, "only 53 calibration examples"),
        (dict(objectives=("bleu",)), UnknownNameError, "unknown objective"),
        (dict(tasks=()), ConfigError, "no tasks"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tiny_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        build_pool(_config(tiny_dir, tmp_path, **overrides))
    assert not (tmp_path / "pool").exists() and not (tmp_path / "run").exists()


def test_baselines_artifact_has_one_set_per_method(tiny_dir, tmp_path):
    pool = build_baselines(_config(tiny_dir, tmp_path))
    assert [e.sources[0].method for e in pool.sets] == ["sleb", "shortened_ppl", "taylor", "shortgpt"]
    assert all(len(e.blocks) == 2 for e in pool.sets)
    with pytest.raises(ConfigError, match="unknown baseline"):
        build_baselines(_config(tiny_dir, tmp_path), ("magic",))


def _found(pool):
    return sorted((s.method, s.task or "", s.objective or "", tuple(e.blocks)) for e in pool.sets for s in e.sources)


@pytest.mark.parametrize("builder", [build_pool, build_baselines])
def test_shrinking_a_pool_equals_searching_at_the_smaller_k(tiny_dir, tmp_path, builder):
    large = builder(_config(tiny_dir, tmp_path, k=3, run_dir=str(tmp_path / "run3"), out=str(tmp_path / "k3")))
    small = builder(_config(tiny_dir, tmp_path, k=1, run_dir=str(tmp_path / "run1"), out=str(tmp_path / "k1")))
    shrunk = shrink_pool(large, 1)
    assert _found(shrunk) == _found(small)
    assert len({e.blocks for e in shrunk.sets}) == len(shrunk.sets)  # sets that coincide at k=1 are merged
    assert shrunk.config["k"] == 1 and shrunk.config["derived_from"]["pool"] == large.fingerprint()
    assert shrink_pool(large, 3) is large
    with pytest.raises(ConfigError, match="only be shrunk"):
        shrink_pool(large, 4)


def test_candidates_cli_derives_a_smaller_k_without_searching(tiny_dir, tmp_path, capsys):
    build_pool(_config(tiny_dir, tmp_path, k=3))
    status = main(["candidates", "--from-pool", str(tmp_path / "pool"), "--k", "2", "--out", str(tmp_path / "k2"),
                   "--model", tiny_dir])
    assert status == 0 and "derived from" in capsys.readouterr().out
    assert CandidatePool.from_pretrained(tmp_path / "k2").config["k"] == 2
    status = main(["baselines", "--from-pool", str(tmp_path / "pool"), "--k", "5", "--out", str(tmp_path / "k5")])
    assert status == 2 and "only be shrunk" in capsys.readouterr().err


def test_candidates_cli(tiny_dir, tmp_path, capsys):
    status = main(["candidates", "--model", tiny_dir, "--tasks", "piqa", "--objectives", "tl", "--k", "2",
                   "--samples", "3", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "pool"),
                   "--no-progress"])
    assert status == 0 and "greedy/piqa/tl" in capsys.readouterr().out
    status = main(["candidates", "--model", tiny_dir, "--k", "9", "--out", str(tmp_path / "x"), "--no-progress"])
    assert status == 2 and "removable" in capsys.readouterr().err


def test_importance_map_measures_every_block_per_task_and_draws_it(tiny_dir, tmp_path):
    from pudding.pruning.importance import ImportanceConfig, block_importance

    result = block_importance(ImportanceConfig(model=tiny_dir, tasks=("piqa", "arc_challenge"), samples=3,
                                               out=str(tmp_path / "imp"), progress=False))
    assert (tmp_path / "imp" / "importance.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert saved["tasks"]["arc_challenge"]["metric"] == "acc_norm"
    for row in result["tasks"].values():
        assert len(row["delta_task_likelihood"]) == NUM_LAYERS == len(row["delta_metric"])
        assert any(abs(d) > 1e-6 for d in row["delta_task_likelihood"])


def test_one_shot_baselines_are_checkpointed_and_reused_on_an_exact_match(tiny_dir, tmp_path, monkeypatch):
    from pudding.pruning import baselines

    first = build_baselines(_config(tiny_dir, tmp_path), ("shortgpt", "taylor"))
    assert sorted(p.name for p in (tmp_path / "run").glob("*-ppl.json")) == ["shortgpt-ppl.json", "taylor-ppl.json"]

    def no_ranking(*args, **kwargs):
        raise AssertionError("a finished one-shot ranking was computed again")

    monkeypatch.setattr(baselines, "rank_blocks", no_ranking)
    again = build_baselines(_config(tiny_dir, tmp_path), ("shortgpt", "taylor"))
    assert _found(again) == _found(first)
    assert [s.seconds for e in again.sets for s in e.sources] == [s.seconds for e in first.sets for s in e.sources]
    with pytest.raises(ConfigError, match=r"shortgpt-ppl.json was written for another .*differs in: samples"):
        build_baselines(_config(tiny_dir, tmp_path, samples=3), ("shortgpt",))
