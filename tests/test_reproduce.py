"""`pudding reproduce` end to end on a tiny model (tiny budget): every table, ablation and plot is written."""

import json
import shutil

import pytest

import pudding.reproduce
from pudding.candidates import CandidatePool
from pudding.reproduce import ReproduceConfig, paired_differences, reproduce


def test_paired_differences():
    columns = {"a": [1, 1, 0, 1], "b": [0, 1, 0, 0]}
    d = paired_differences(columns, "a", ["b"])["b"]
    assert d["difference"] == pytest.approx(0.5) and d["ci95"][0] < 0.5 < d["ci95"][1] and d["n"] == 4


def test_reproduce_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    config = ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(tmp_path / "results" / "k2"),
                             run_dir=str(tmp_path / "run"), routers=(("llm-embed", "mse"), ("llm-embed", "ce")),
                             router_seeds=2, progress=False)
    result = reproduce(config)
    out = tmp_path / "results" / "k2"
    main = json.loads((out / "main.json").read_text())
    rows = main["rows"]
    for row in ("dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "random pool set",
                "PuDDing (llm-embed-mse)", "PuDDing (llm-embed-mse, mean of 2 seeds)", "oracle"):
        assert row in rows
        assert all(cell["n"] == 8 for cell in rows[row]["tasks"].values())
    # the oracle is an upper bound of every routing decision over the same pool, document by document
    assert rows["oracle"]["average"] >= rows["PuDDing (llm-embed-mse)"]["average"]
    assert rows["oracle"]["average"] >= rows["best static TL set"]["average"]
    assert set(main["paired_differences"]) >= {"dense", "sleb"}
    assert main["provenance"]["git"] and main["budget"]["paper_tasks"] == 8
    headroom = main["headroom"]  # documents where the pool's sets disagree: the only place routing matters
    assert headroom["all_sets_right"] + headroom["all_sets_wrong"] + headroom["mixed"] == headroom["documents"] == 48
    if headroom["mixed"]:
        assert headroom["accuracy_on_mixed"]["oracle"]["value"] == 1.0
    for name in ("generalisation.json", "ablation-router.json", "ablation-objective.json", "ablation-pool_size.json",
                 "omission-rates.png", "router-convergence.png", "block-importance.png", "README.md"):
        assert (out / name).exists(), name
    assert "PuDDing (llm-embed-ce)" in json.loads((out / "ablation-router.json").read_text())["rows"]
    seeds = json.loads((out / "ablation-router_seed.json").read_text())
    assert list(seeds["rows"]) == ["PuDDing (llm-embed-mse)", "PuDDing (llm-embed-mse-seed1)"]
    assert seeds["spread"]["min"] <= seeds["spread"]["mean"] <= seeds["spread"]["max"]
    # the seed-averaged row is, document by document, the mean of the seeds' rows
    mean_row = rows["PuDDing (llm-embed-mse, mean of 2 seeds)"]["average"]
    assert mean_row == pytest.approx(seeds["spread"]["mean"])
    # a rerun resumes from the saved scores and reproduces the tables exactly
    again = reproduce(config)
    assert again["tables"]["main"]["rows"] == result["tables"]["main"]["rows"]


def test_a_smaller_k_reuses_the_larger_searches_and_joins_the_accuracy_against_k_plot(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    results = tmp_path / "results"
    routers = (("llm-embed", "mse"),)
    # one run_dir for both k, as a user would leave it
    reproduce(ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(results / "k2"), run_dir=str(tmp_path / "run"),
                              routers=routers, router_seeds=1, progress=False))
    for name in ("pool", "baselines"):  # laid out like the committed results/smollm2
        shutil.copytree(results / "k2" / name, results / name)
    monkeypatch.setitem(pudding.reproduce.COMMITTED, tiny_dir, results)
    reproduce(ReproduceConfig(model=tiny_dir, k=1, budget="tiny", out=str(results / "k1"), run_dir=str(tmp_path / "run"),
                              routers=routers, router_seeds=1, progress=False))
    pool = CandidatePool.from_pretrained(results / "k1" / "pool")
    assert pool.config["k"] == 1 and pool.config["derived_from"]["k"] == 2  # shrunk, not searched again
    assert json.loads((results / "k1" / "main.json").read_text())["config"]["k"] == 1
    curve = json.loads((results / "accuracy-vs-k-tiny.json").read_text())
    assert [p["k"] for p in curve["series"]["PuDDing"]] == [1, 2]
    assert [p["k"] for p in curve["series"]["dense"]] == [0, 1, 2]
    assert (results / "accuracy-vs-k-tiny.png").exists() and curve["provenance"]["git"]


def test_compare_results_script_ignores_provenance_and_catches_a_changed_table(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "compare_results.py"
    spec = importlib.util.spec_from_file_location("compare_results", script)
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    for name, average, date in (("a", 0.5, "2026-01-01"), ("b", 0.5, "2026-02-02")):
        (tmp_path / name / "k6").mkdir(parents=True)
        (tmp_path / name / "k6" / "main.json").write_text(json.dumps({"rows": {"dense": average},
                                                                       "provenance": {"date": date}}))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    (tmp_path / "a" / "k6" / "main.json").write_text(json.dumps({"rows": {"dense": 0.6}}))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
