"""`pudding reproduce` end to end on a tiny model (tiny budget): every table, ablation and plot is written."""

import json
import shutil

import pytest

import pudding.evaluation.reproduce
from pudding.core.errors import ConfigError
from pudding.evaluation.reproduce import Budget, ReproduceConfig, paired_differences, reproduce
from pudding.pool.artifact import CandidatePool


def test_paired_differences():
    columns = {"a": [1, 1, 0, 1], "b": [0, 1, 0, 0]}
    d = paired_differences(columns, "a", ["b"])["b"]
    assert d["difference"] == pytest.approx(0.5) and d["ci95"][0] < 0.5 < d["ci95"][1] and d["n"] == 4


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """One tiny reproduction at k=2, shared by the tests below (each stage costs minutes on 2 cores)."""
    root = tmp_path_factory.mktemp("reproduce")
    config = ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(root / "results" / "tiny" / "k2"),
                             run_dir=str(root / "run"), routers=(("llm-embed", "mse"), ("llm-embed", "ce")),
                             router_seeds=2, reuse=None, progress=False)
    return root, config, reproduce(config)


def test_reproduce_end_to_end_on_a_tiny_model(tiny_run):
    root, config, result = tiny_run
    out = config.folder
    main = json.loads((out / "main.json").read_text())
    rows = main["rows"]
    best = result["selection"]["best"]
    for row in ("dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "best static set",
                "task-best set", "random pool set", "PuDDing (paper: llm-embed-mse)",
                "PuDDing (paper: llm-embed-mse, mean of 2 seeds)", f"PuDDing, best variant ({best})",
                f"PuDDing, best variant ({best}, mean of 2 seeds)",
                "pool ceiling (optimistic: best set per task on these documents)", "oracle"):
        assert row in rows
        assert all(cell["n"] == 8 for cell in rows[row]["tasks"].values())
    # the best variant is the one with the highest validation accuracy on calibration prompts
    accuracy = result["selection"]["validation_accuracy"]
    assert accuracy[best] == max(v for v in accuracy.values() if v == v)
    assert set(main["paired_differences"]["PuDDing (paper: llm-embed-mse)"]) >= {"dense", "sleb", "task-best set"}
    assert main["provenance"]["git"] and main["budget"]["paper_tasks"] == 8
    stages = json.loads((out / "stages.json").read_text())
    assert {"pool and baselines", "calibration labels", "evaluation scores", "routers"} <= set(stages["seconds"])
    headroom = main["headroom"]  # documents where the pool's sets disagree: the only place routing matters
    assert headroom["all_sets_right"] + headroom["all_sets_wrong"] + headroom["mixed"] == headroom["documents"] == 48
    if headroom["mixed"]:
        assert headroom["accuracy_on_mixed"]["pool oracle"]["value"] == 1.0
    for name in ("generalisation.json", "ablation-router.json", "ablation-objective.json", "ablation-pool_size.json",
                 "ablation-routing.json",
                 "omission-rates.png", "router-convergence.png", "block-importance.png", "README.md"):
        assert (out / name).exists(), name
    assert "PuDDing (llm-embed-ce)" in json.loads((out / "ablation-router.json").read_text())["rows"]
    seeds = json.loads((out / "ablation-router_seed.json").read_text())
    assert list(seeds["rows"]) == ["PuDDing (llm-embed-mse)", "PuDDing (llm-embed-mse-seed1)"]
    # the seed-averaged row is, document by document, the mean of the seeds' rows
    mean_row = rows["PuDDing (paper: llm-embed-mse, mean of 2 seeds)"]["average"]
    assert mean_row == pytest.approx(seeds["spread"]["mean"])
    # a rerun resumes from the saved scores and reproduces the tables exactly
    again = reproduce(config)
    assert again["tables"]["main"]["rows"] == result["tables"]["main"]["rows"]


def test_a_smaller_k_reuses_the_larger_searches_and_joins_the_accuracy_against_k_plot(tiny_run, tiny_dir,
                                                                                       monkeypatch):
    root, _, _ = tiny_run
    results = root / "results" / "tiny"
    monkeypatch.setitem(pudding.evaluation.reproduce.COMMITTED, tiny_dir, root / "results")  # --reuse auto looks there
    # one run_dir for both k, as a user would leave it
    reproduce(ReproduceConfig(model=tiny_dir, k=1, budget="tiny", out=str(results / "k1"), run_dir=str(root / "run"),
                              routers=(("llm-embed", "mse"),), router_seeds=1, variants=False, progress=False))
    pool = CandidatePool.from_pretrained(results / "k1" / "pool")
    assert pool.config["k"] == 1 and pool.config["derived_from"]["k"] == 2  # shrunk, not searched again
    assert json.loads((results / "k1" / "main.json").read_text())["config"]["k"] == 1
    curve = json.loads((results / "accuracy-vs-k-tiny.json").read_text())
    assert [p["k"] for p in curve["series"]["PuDDing (paper)"]] == [1, 2]
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


def test_another_budget_reuses_nothing_and_a_mismatched_own_folder_is_refused(tiny_run, tiny_dir, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setitem(pudding.evaluation.reproduce.BUDGETS, "tiny-b", Budget(6, 3, 10, 12, ("tl",)))
    root, _, _ = tiny_run
    results = tmp_path / "results"
    shutil.copytree(root / "results" / "tiny", results / "tiny")  # a finished tiny run to (not) reuse

    def config(budget, out):
        return ReproduceConfig(model=tiny_dir, k=2, budget=budget, out=str(out), run_dir=str(tmp_path / "run"),
                               routers=(("llm-embed", "mse"),), router_seeds=1, variants=False, reuse=str(results),
                               progress=False)

    reproduce(config("tiny-b", results / "tiny-b" / "k2"))
    artifacts = json.loads((results / "tiny-b" / "k2" / "stages.json").read_text())["artifacts"]
    assert artifacts and all("built" in entry for entry in artifacts.values()), artifacts
    main = json.loads((results / "tiny-b" / "k2" / "main.json").read_text())
    assert all(cell["n"] == 6 for cell in main["rows"]["dense"]["tasks"].values())
    # the same budget again reuses everything it built
    reproduce(config("tiny-b", results / "tiny-b-again" / "k2"))
    again = json.loads((results / "tiny-b-again" / "k2" / "stages.json").read_text())["artifacts"]
    assert all("reused" in entry for entry in again.values()), again
    # a run whose own folder holds another budget's artifacts is refused, naming what differs
    with pytest.raises(ConfigError, match=r"differs in: .*samples"):
        reproduce(config("tiny-b", results / "tiny" / "k2"))
