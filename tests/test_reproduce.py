"""`pudding reproduce` on a tiny model (tiny budget): every table, ablation and plot is written, and the cells
are what the per-document scores say, recomputed here without pudding's table code."""

import itertools
import json
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import pudding.evaluation.reproduce
from pudding.core.errors import ConfigError
from pudding.core.tasks import get_task
from pudding.evaluation.external import ExternalRow, blocks_removed
from pudding.evaluation.report import plotted_rows
from pudding.evaluation.reproduce import Budget, ReproduceConfig, reproduce
from pudding.evaluation.tables import (
    RowId,
    gap_decomposition,
    paired_differences,
    static_choices,
    static_columns,
)
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
from pudding.routing.train import VAL_FRACTION, RoutingData, split_rows


def test_paired_differences_are_the_mean_difference_with_a_normal_interval():
    columns = {"a": [1, 1, 0, 1], "b": [0, 1, 0, 0]}
    d = paired_differences(columns, "a", ["b"])["b"]
    # differences 1, 0, 0, 1: mean 0.5, sample sd sqrt(1/3), standard error sqrt(1/3) / 2
    half = 1.96 * (1 / 3) ** 0.5 / 2
    assert d["difference"] == 0.5 and d["n"] == 4
    assert d["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-12)


def test_row_ids_render_the_labels_the_tables_have_always_used():
    assert RowId("dense").label == "dense" and RowId("dense").kind == "static"
    assert RowId("pool ceiling").label == "pool ceiling (optimistic: best set per task on these documents)"
    assert RowId("oracle").kind == "bound"
    paper = RowId("pudding", router="embed-mlp-mse", role="paper")
    assert (paper.label, paper.kind) == ("PuDDing (paper: embed-mlp-mse)", "pudding")
    best = RowId("pudding", router="x-safe", role="best variant", seeds=3)
    assert (best.label, best.kind) == ("PuDDing, best variant (x-safe, mean of 3 seeds)", "pudding-seeds")
    assert RowId("pudding", router="llm-embed-ce").label == "PuDDing (llm-embed-ce)"
    assert RowId("pudding", router="r", role="paper", sets="tl", size=6).label == "PuDDing, tl sets only (6)"
    assert RowId("pudding", router="r", role="paper", size=3).label == "3 sets"


def test_static_choices_are_made_on_calibration_data_never_on_evaluation_data():
    def data(correct, labels=None):
        correct = torch.tensor(correct, dtype=torch.float64)
        return RoutingData([f"p{i}" for i in range(len(correct))],
                           torch.zeros_like(correct) if labels is None else torch.tensor(labels, dtype=torch.float64),
                           correct, ["arc_easy"] * len(correct))

    # columns: 0 dense, 1 and 2 pool sets. On calibration set 1 is right everywhere (and has the best TL label);
    # on evaluation set 2 is.
    calibration = data([[0, 1, 0]] * 4, labels=[[0.0, -1.0, -2.0]] * 4)
    evaluation = data([[1, 0, 1], [0, 0, 1], [1, 0, 1]])
    static = static_choices(calibration, [0, 1, 2, 3], pool_columns=[1, 2], candidates=[1, 2])
    columns = static_columns(evaluation, {"dense": 0}, static, [1, 2], [1, 2], seed=0)
    for row in ("best static set", "best static TL set", "task-best set"):
        assert columns[RowId(row)] == [0.0, 0.0, 0.0], row  # set 1's evaluation results, chosen beforehand
    assert columns[RowId("dense")] == [1.0, 0.0, 1.0]
    # the hindsight bounds are the only rows that look at the evaluation documents
    assert columns[RowId("pool ceiling")] == columns[RowId("oracle")] == [1.0, 1.0, 1.0]


def test_the_gap_decomposition_pairs_each_step_on_the_same_documents():
    ours = RowId("pudding", router="r", role="best variant", seeds=2)
    columns = {RowId("best static set"): [1, 0, 0, 0], RowId("task-best set"): [1, 1, 0, 0],
               RowId("pool ceiling"): [1, 1, 1, 0], ours: [1, 0, 1, 0.5]}
    steps = gap_decomposition(columns, ours)
    expected = {f"{ours.label} - best static set": 0.375, "task-best set - best static set": 0.25,
                "pool ceiling - best static set": 0.5, "pool ceiling - task-best set": 0.25,
                f"task-best set - {ours.label}": -0.125}
    assert {name: d["difference"] for name, d in steps.items()} == expected
    # per-document pairs: task-best - ours is 0, +1, -1, -0.5, so its interval is wide, not the rows' own spread
    assert steps[f"task-best set - {ours.label}"]["ci95"][0] < -0.5


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, tmp_path_factory):
    """One tiny reproduction at k=2, shared by the tests below (each stage costs minutes on 2 cores)."""
    root = tmp_path_factory.mktemp("reproduce")
    config = ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(root / "results" / "tiny" / "k2"),
                             run_dir=str(root / "run"), routers=(("llm-embed", "mse"), ("llm-embed", "ce")),
                             router_seeds=2, progress=False)
    return root, config, reproduce(config)


def _correct(folder: Path, blocks: tuple) -> list[tuple[str, str, float]]:
    """(task, prompt, 0/1) per document of a score file under the set ``blocks``, from the stored log-likelihoods
    by lm-eval's rule: the highest summed log-likelihood (``acc``) or per character of the choice
    (``acc_norm``), the first choice on ties."""
    sets = [tuple(s) for s in json.loads((folder / "labels.json").read_text())["sets"]]
    column = sets.index(tuple(blocks))
    out = []
    for row in pq.read_table(folder / "labels.parquet").to_pylist():
        lls = row["choice_logprob"][column]
        if get_task(row["task"]).metric == "acc_norm":
            lls = [ll / n for ll, n in zip(lls, row["choice_chars"])]
        best = max(range(len(lls)), key=lambda i: (lls[i], -i))
        out.append((row["task"], row["router_text"], float(best == row["gold"])))
    return out


def _cells(correct: list[tuple[str, str, float]]) -> dict[str, dict[str, float]]:
    by_task: dict[str, list[float]] = {}
    for task, _, value in correct:
        by_task.setdefault(task, []).append(value)
    return {t: {"value": sum(v) / len(v), "stderr": statistics.stdev(v) / len(v) ** 0.5, "n": len(v)}
            for t, v in by_task.items()}


def _assert_row(table: dict, row: str, cells: dict) -> None:
    got = table["rows"][row]["tasks"]
    assert set(got) == set(cells), row
    for task, cell in cells.items():
        assert got[task]["n"] == cell["n"], (row, task)
        assert got[task]["value"] == pytest.approx(cell["value"], abs=1e-12), (row, task)
        assert got[task]["stderr"] == pytest.approx(cell["stderr"], abs=1e-12), (row, task)
    assert table["rows"][row]["average"] == pytest.approx(statistics.fmean(c["value"] for c in cells.values()))


def test_reproduce_writes_every_table_ablation_and_plot(tiny_run):
    root, config, result = tiny_run
    out = config.folder
    main = json.loads((out / "main.json").read_text())
    best = result["selection"]["best"]
    expected = ["dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "best static set",
                "task-best set", "random pool set", "PuDDing (paper: llm-embed-mse)",
                "PuDDing (paper: llm-embed-mse, mean of 2 seeds)", f"PuDDing, best variant ({best})",
                f"PuDDing, best variant ({best}, mean of 2 seeds)",
                "pool ceiling (optimistic: best set per task on these documents)", "oracle"]
    assert list(main["rows"]) == expected  # static rows, PuDDing, then the bounds
    assert all(cell["n"] == 8 for row in main["rows"].values() for cell in row["tasks"].values())
    assert main["kinds"]["PuDDing (paper: llm-embed-mse, mean of 2 seeds)"] == "pudding-seeds"
    assert set(main["paired_differences"]["PuDDing (paper: llm-embed-mse)"]) == set(expected[:9])
    assert main["provenance"]["git"] and main["budget"]["paper_tasks"] == 8
    stages = json.loads((out / "stages.json").read_text())
    assert {"pool and baselines", "calibration labels", "evaluation scores", "routers"} <= set(stages["seconds"])
    for name in ("generalisation.json", "ablation-router.json", "ablation-objective.json", "ablation-pool_size.json",
                 "ablation-routing.json", "paired-differences.png", "omission-rates.png", "router-convergence.png",
                 "block-importance.png", "README.md"):
        assert (out / name).exists(), name
    assert "PuDDing (llm-embed-ce)" in json.loads((out / "ablation-router.json").read_text())["rows"]
    routing = json.loads((out / "ablation-routing.json").read_text())["rows"]  # the grid crosses both routers
    assert {"PuDDing (llm-embed-mse-margin-pool)", "PuDDing (task-mse)",
            "PuDDing (task-mse-choice-prob-pool-plus-baselines-safe)"} <= set(routing)
    seeds = json.loads((out / "ablation-router_seed.json").read_text())
    assert list(seeds["rows"]) == ["PuDDing (llm-embed-mse)", "PuDDing (llm-embed-mse-seed1)"]
    readme = (out / "README.md").read_text()
    assert "### Main table (paper Table 1)" in readme and f"| PuDDing, best variant ({best}) |" in readme
    # the gap is decomposed for the best variant's seed mean, on the same documents as the rows
    ours = f"PuDDing, best variant ({best}, mean of 2 seeds)"
    steps = main["decomposition"]
    assert set(steps) == {f"{ours} - best static set", "task-best set - best static set",
                          "pool ceiling - best static set", "pool ceiling - task-best set", f"task-best set - {ours}"}
    average = {row: main["rows"][row]["average"] for row in main["rows"]}  # every task has 8 documents
    assert steps[f"task-best set - {ours}"]["difference"] == pytest.approx(average["task-best set"] - average[ours])
    assert "Where the gap is" in readme


def test_table_cells_are_the_per_document_scores_recomputed_independently(tiny_run):
    _, config, _ = tiny_run
    out = config.folder
    main = json.loads((out / "main.json").read_text())
    scores = out / "scores" / "paper-tasks"
    _assert_row(main, "dense", _cells(_correct(scores, ())))
    sleb = next(e.blocks for e in CandidatePool.from_pretrained(out / "baselines").sets
                for s in e.sources if s.method == "sleb")
    _assert_row(main, "sleb", _cells(_correct(scores, sleb)))
    generalisation = json.loads((out / "generalisation.json").read_text())
    _assert_row(generalisation, "dense", _cells(_correct(out / "scores" / "unseen-tasks", ())))


def test_the_best_static_set_is_the_best_on_calibration_prompts(tiny_run):
    """Chosen by accuracy on the routers' training prompts (calibration split), then scored on evaluation."""
    _, config, _ = tiny_run
    out = config.folder
    pool, baselines = CandidatePool.from_pretrained(out / "pool"), CandidatePool.from_pretrained(out / "baselines")
    candidates = list(dict.fromkeys([e.blocks for e in pool.sets] + [e.blocks for e in baselines.sets]))
    calibration = {blocks: _correct(out / "labels", blocks) for blocks in candidates}
    train, _ = split_rows([text for _, text, _ in calibration[candidates[0]]], VAL_FRACTION)
    accuracy = {blocks: sum(values[i][2] for i in train) / len(train) for blocks, values in calibration.items()}
    chosen = max(candidates, key=lambda blocks: accuracy[blocks])  # the first of the best, as the code breaks ties
    main = json.loads((out / "main.json").read_text())
    _assert_row(main, "best static set", _cells(_correct(out / "scores" / "paper-tasks", chosen)))


def test_the_best_variant_is_chosen_by_its_calibration_validation_record(tiny_run):
    _, config, result = tiny_run
    selection = result["selection"]
    recorded = {}
    for name in selection["validation_accuracy"]:
        training = json.loads((config.folder / "routers" / name / "training.json").read_text())
        recorded[name] = training["safe"]["acc_safe_crossfit"] if "safe" in training else training["val"]["acc_routed"]
    assert recorded == pytest.approx(selection["validation_accuracy"], nan_ok=True)
    assert selection["best"] == max((n for n in recorded if recorded[n] == recorded[n]), key=recorded.get)


def test_a_rerun_that_scores_again_gives_the_same_tables(tiny_run):
    _, config, _ = tiny_run
    before = {name: json.loads((config.folder / f"{name}.json").read_text()) for name in ("main", "generalisation")}
    for name in ("scores/paper-tasks", "scores/unseen-tasks"):  # the scores and their checkpointed shards
        shutil.rmtree(config.folder / name)
        shutil.rmtree(config.work_dir / name.replace("/", "-"))
    reproduce(config)
    artifacts = json.loads((config.folder / "stages.json").read_text())["artifacts"]
    assert "built" in artifacts["scores/paper-tasks"] and "built" in artifacts["scores/unseen-tasks"]
    for name, table in before.items():
        again = json.loads((config.folder / f"{name}.json").read_text())
        for key in ("rows", "kinds", "paired_differences", "headroom"):
            assert again[key] == table[key], (name, key)


def test_a_smaller_k_reuses_the_larger_searches_and_joins_the_accuracy_against_k_plot(tiny_run, tiny_dir):
    root, _, _ = tiny_run
    results = root / "results" / "tiny"
    # one run_dir for both k, as a user would leave it; --reuse names where the k=2 run is
    reproduce(ReproduceConfig(model=tiny_dir, k=1, budget="tiny", out=str(results / "k1"), run_dir=str(root / "run"),
                              routers=(("llm-embed", "mse"),), router_seeds=1, variants=False,
                              reuse=str(root / "results"), progress=False))
    pool = CandidatePool.from_pretrained(results / "k1" / "pool")
    assert pool.config["k"] == 1 and pool.config["derived_from"]["k"] == 2  # shrunk, not searched again
    assert json.loads((results / "k1" / "main.json").read_text())["config"]["k"] == 1
    curve = json.loads((results / "accuracy-vs-k-tiny.json").read_text())
    assert [p["k"] for p in curve["series"]["PuDDing (paper)"]] == [1, 2]
    assert [p["k"] for p in curve["series"]["PuDDing, best variant (seed mean)"]] == [2]  # k=1 has no variants
    assert [p["k"] for p in curve["series"]["dense"]] == [0, 1, 2]
    k2 = json.loads((results / "k2" / "main.json").read_text())
    assert curve["series"]["dense"][2]["average"] == k2["rows"]["dense"]["average"]
    assert (results / "accuracy-vs-k-tiny.png").exists() and curve["provenance"]["git"]


def test_plotted_rows_are_rendered_from_the_recorded_config(tmp_path):
    data = {"config": {"routers": [["embed-mlp", "mse"]], "router_seeds": 3}}
    (tmp_path / "ablation-routing.json").write_text(json.dumps({"selection": {"best": "embed-mlp-mse-safe"}}))
    plotted = plotted_rows(data, tmp_path)
    assert plotted["PuDDing (paper: embed-mlp-mse)"] == "PuDDing (paper)"
    seed_mean = "PuDDing, best variant (embed-mlp-mse-safe, mean of 3 seeds)"
    assert plotted[seed_mean] == "PuDDing, best variant (seed mean)"
    assert "PuDDing (paper: embed-mlp-mse, mean of 3 seeds)" not in plotted  # a seed mean is not the paper's row


def test_reuse_is_explicit(tmp_path):
    assert ReproduceConfig().reuse is None and ReproduceConfig().reuse_root is None
    assert ReproduceConfig(reuse=str(tmp_path)).reuse_root == tmp_path
    with pytest.raises(ConfigError, match="--reuse .*no such folder"):
        ReproduceConfig(reuse=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="--extra-pool .*no such folder"):
        ReproduceConfig(extra_pool=str(tmp_path / "missing"))


def test_compare_results_script_ignores_provenance_and_catches_a_changed_table(tmp_path):
    import importlib.util

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
    for name in ("pool", "baselines"):  # each run's folder holds the pool and baselines its tables used
        reused = CandidatePool.from_pretrained(again[name]["reused"])
        copied = CandidatePool.from_pretrained(results / "tiny-b-again" / "k2" / name)
        assert again[name]["reused"] != str(results / "tiny-b-again" / "k2" / name)
        assert [e.blocks for e in copied.sets] == [e.blocks for e in reused.sets] and copied.sets
        assert copied.provenance == reused.provenance
    # a run whose own folder holds another budget's artifacts is refused, naming what differs
    with pytest.raises(ConfigError, match=r"differs in: .*samples"):
        reproduce(config("tiny-b", results / "tiny" / "k2"))


def test_a_router_folder_without_its_weights_is_retrained_not_reused(tiny_run, tiny_dir, tmp_path):
    """Large routers' weights are not committed: a clean clone holds their records without them. Reproduce
    then trains them again, into its own folder, and still reuses every router whose weights are there."""
    root, _, _ = tiny_run
    results = tmp_path / "results"
    shutil.copytree(root / "results" / "tiny", results / "tiny")
    (results / "tiny" / "k2" / "routers" / "llm-embed-mse-seed1" / "router.safetensors").unlink()
    out = results / "tiny-again" / "k2"
    reproduce(ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(out), run_dir=str(root / "run"),
                              routers=(("llm-embed", "mse"),), router_seeds=2, variants=False,
                              reuse=str(results), progress=False))
    artifacts = json.loads((out / "stages.json").read_text())["artifacts"]
    assert artifacts["router llm-embed-mse-seed1"] == {"built": str(out / "routers" / "llm-embed-mse-seed1")}
    assert artifacts["router llm-embed-mse"] == {"reused": str(results / "tiny" / "k2" / "routers" / "llm-embed-mse")}
    assert (out / "routers" / "llm-embed-mse-seed1" / "router.safetensors").exists()


def test_an_extra_pool_is_scored_alone_offered_to_the_static_choices_and_routed_over(tiny_run, tiny_dir, tmp_path):
    """--extra-pool in the same --run-dir: only its new set is scored (the shared sets' shards are untouched), the
    static choices may pick it, and the widest routing variant routes over it."""
    root, config, _ = tiny_run
    pool = CandidatePool.from_pretrained(config.folder / "pool")
    scored = [tuple(s) for s in json.loads((config.folder / "labels" / "labels.json").read_text())["sets"]]
    new = next(pair for pair in itertools.combinations(range(6), 2) if pair not in scored)
    source = SetSource("greedy", "arc_easy", "choice-prob", list(new), [0.0, 0.0, 0.0], [], 0.0)
    CandidatePool((PoolEntry(new, (source,)),), pool.model, {"k": 2}, {}).save_pretrained(tmp_path / "extra")
    shard = config.work_dir / "labels" / "shard-00000"
    before = {f.name: f.stat().st_mtime_ns for f in shard.glob("set-*.parquet")}

    extra_config = replace(config, out=str(tmp_path / "results" / "k2"), extra_pool=str(tmp_path / "extra"),
                           routers=(("llm-embed", "mse"),), router_seeds=1, variants=False)
    assert extra_config.pool_variants[-1] == "pool+baselines+extra"
    reproduce(extra_config)
    after = {f.name: f.stat().st_mtime_ns for f in shard.glob("set-*.parquet")}
    assert set(after) - set(before) == {f"set-{'-'.join(map(str, new))}.parquet"}
    assert all(after[name] == mtime for name, mtime in before.items())  # the shared sets were not scored again

    out = extra_config.folder
    candidates = scored[1:] + [new]  # every set but dense, the extra one last
    calibration = {blocks: _correct(out / "labels", blocks) for blocks in candidates}
    train, _ = split_rows([text for _, text, _ in calibration[candidates[0]]], VAL_FRACTION)
    accuracy = {blocks: sum(values[i][2] for i in train) / len(train) for blocks, values in calibration.items()}
    chosen = max(candidates, key=lambda blocks: accuracy[blocks])
    main = json.loads((out / "main.json").read_text())
    _assert_row(main, "best static set", _cells(_correct(out / "scores" / "paper-tasks", chosen)))
    names = [spec.pool for spec in pudding.evaluation.reproduce._variant_specs(replace(extra_config, variants=True))]
    assert names.count("pool+baselines+extra") == names.count("pool") > 0

    small = SetSource("greedy", "arc_easy", "choice-prob", [2], [0.0, 0.0], [], 0.0)
    CandidatePool((PoolEntry((2,), (small,)),), pool.model, {"k": 1}, {}).save_pretrained(tmp_path / "k1")
    with pytest.raises(ConfigError, match="shrunk"):  # an extra pool searched at a smaller k is refused
        reproduce(replace(extra_config, extra_pool=str(tmp_path / "k1"), out=str(tmp_path / "results" / "k1")))


def test_the_executor_settings_reach_the_searches_and_the_scoring_but_not_the_baselines(tiny_run, tmp_path,
                                                                                        monkeypatch):
    """``reproduce --executor ray`` spreads the searches and every label or score run over Ray actors (their
    equality with local runs is tests/test_distributed.py's); the baselines' one-shot methods need gradients
    and stay local."""
    from pudding.evaluation.reproduce import _scores, _search_config

    _, config, _ = tiny_run
    spread = replace(config, out=str(tmp_path / "k2"), executor="ray", ray_actors=3, ray_address="auto")
    assert {k: getattr(_search_config(spread, "pool"), k) for k in spread.execution} == spread.execution
    assert _search_config(spread, "baselines").executor == "local"
    asked = []

    def build_labels(label_config, **_):
        asked.append(label_config)
        return tmp_path / "unused"

    monkeypatch.setattr(pudding.evaluation.reproduce, "build_labels", build_labels)
    scoring_pool = CandidatePool.from_pretrained(config.work_dir / "scoring-pool")
    _scores(spread, scoring_pool, "evaluation", ("piqa",), 2, "scores/paper-tasks", None, None, {})
    assert [{k: getattr(c, k) for k in spread.execution} for c in asked] == [spread.execution]


def test_the_paired_differences_plot_draws_every_interval_of_the_table(tmp_path):
    from pudding.evaluation.report import plot_paired_differences

    def d(value, low, high):
        return {"difference": value, "ci95": [low, high], "n": 8}

    pairs = {"PuDDing (a)": {"dense": d(-0.1, -0.2, 0.0), "sleb": d(0.05, -0.05, 0.15)},
             "PuDDing (b)": {"dense": d(0.0, -0.1, 0.1)}}
    table = {"paired_differences": pairs, "decomposition": {"task-best set - best static set": d(0.2, 0.1, 0.3)}}
    drawn = plot_paired_differences(table, tmp_path / "paired.png")
    assert drawn == {"PuDDing minus each static row": {"PuDDing (a)": {"dense": [-0.1, -0.2, 0.0],
                                                                       "sleb": [0.05, -0.05, 0.15]},
                                                       "PuDDing (b)": {"dense": [0.0, -0.1, 0.1]}},
                     "where the gap is": {"": {"task-best set - best static set": [0.2, 0.1, 0.3]}}}
    assert (tmp_path / "paired.png").stat().st_size > 10_000
    # the unseen tasks' table has no decomposition: one panel
    assert list(plot_paired_differences({"paired_differences": pairs}, tmp_path / "one.png")) == [
        "PuDDing minus each static row"]



def _baselines_table():
    import sys
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import baselines_table
    return baselines_table


def test_reviewer_rows_from_pudding_eval_line_up_with_the_tables_own_rows(tiny_run, tiny_dir, tmp_path):
    """`pudding eval` of dense and of SLEB's set on the table's documents, read as external rows (as LaCo's or
    FinerCut's are), gives exactly the table's dense and SLEB cells, and PuDDing's paired differences to them."""
    from pudding.evaluation.report import plot_accuracy_vs_k
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    baselines_table = _baselines_table()
    _, config, _ = tiny_run
    out = config.folder
    main = json.loads((out / "main.json").read_text())
    sleb = next(e.blocks for e in CandidatePool.from_pretrained(out / "baselines").sets
                for s in e.sources if s.method == "sleb")
    tasks = tuple(main["metrics"])
    # two sub-layers count as one block: four of them, in four blocks, are k=2
    evaluate(EvalConfig(model=tiny_dir, tasks=tasks, omissions=((), sleb, (1, "2.attn", "3.mlp")),
                        limit=main["budget"]["paper_tasks"], output_dir=str(tmp_path / "eval"), progress=False))
    rows = [ExternalRow.parse(f"{name}={tmp_path / 'eval'}#{label}") for name, label in
            (("dense again", "dense"), ("SLEB again", "omit " + ",".join(map(str, sleb))),
             ("sub-layers", "omit 1,2.attn,3.mlp"))]
    result = baselines_table.measure(out, rows)
    for ours, against in result["paired_differences"].items():
        assert against["dense again"] == against["dense"] and against["SLEB again"] == against["sleb"], ours
        assert ours in main["rows"] and result["rows"][ours]["average"] == main["rows"][ours]["average"]
    assert result["rows"]["dense again"] == result["rows"]["dense"] == main["rows"]["dense"]
    assert result["rows"]["SLEB again"] == main["rows"]["sleb"]
    assert result["sources"]["sub-layers"]["blocks_removed"] == 2
    assert result["kinds"]["SLEB again"] == "external" and result["kinds"]["sleb"] == "static"
    # the budget's accuracy-against-k plot carries the external rows once they sit beside the table
    (out / "reviewer-baselines.json").write_text(json.dumps({**result, "provenance": main["provenance"]}))
    try:
        curve = plot_accuracy_vs_k(out.parent, "tiny")
    finally:
        (out / "reviewer-baselines.json").unlink()
    sleb_point = dict(zip(("average", "stderr"), _averaged(main["rows"]["sleb"])))
    assert curve["series"]["SLEB again"] == [{"k": 2, **sleb_point}]
    assert any(s["file"].endswith("reviewer-baselines.json") for s in curve["sources"])


def _averaged(row: dict) -> tuple[float, float]:
    cells = list(row["tasks"].values())
    return row["average"], sum(c["stderr"] ** 2 for c in cells) ** 0.5 / len(cells)


def test_a_routed_eval_is_the_tables_pudding_row_and_the_heal_table_sets_it_beside_the_table(tiny_run, tiny_dir,
                                                                                              tmp_path):
    """`pudding eval --routed` with the table's own router, each document scored without the set routed to it, read
    by scripts/heal_table.py as a row: it is exactly the table's PuDDing row, which came from the saved scores."""
    import runpy

    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    _, config, _ = tiny_run
    out = config.folder
    main = json.loads((out / "main.json").read_text())
    label = next(name for name, kind in main["kinds"].items()
                 if kind == "pudding" and name.startswith("PuDDing (paper: "))
    router = label[label.index("(") + 1:-1].split(": ")[-1]
    artifact = next(iter(main["artifacts"][f"router {router}"].values()))
    tasks = tuple(main["metrics"])
    evaluate(EvalConfig(model=tiny_dir, tasks=tasks, routed=artifact, limit=main["budget"]["paper_tasks"],
                        output_dir=str(tmp_path / "routed"), progress=False))
    heal_table = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "heal_table.py"))
    assert heal_table["main"](["--run", str(out), "--row", f"PuDDing again={tmp_path / 'routed'}",
                               "--favoured", tasks[0], "--out", str(tmp_path / "table")]) == 0
    result = json.loads((tmp_path / "table" / "healing-table.json").read_text())
    rows = result["rows"]
    assert rows["PuDDing again"]["tasks"] == rows[label]["tasks"] == main["rows"][label]["tasks"]
    assert result["paired_differences"]["PuDDing again"][label]["difference"] == 0
    assert set(result["paired_differences"]) == {name for name in rows if name.startswith("PuDDing")}
    assert result["kinds"]["PuDDing again"] == "pudding eval" and result["kinds"]["dense"] == "unhealed (the table's)"
    others = [rows["dense"]["tasks"][t]["value"] for t in tasks[1:]]
    assert rows["dense"]["average_without_favoured"] == pytest.approx(sum(others) / len(others))
    # without the favoured task, a paired difference is the difference of the document-weighted means of the rest
    without = result["paired_differences_without_favoured"][label]["dense"]
    counts = [rows[label]["tasks"][t]["n"] for t in tasks[1:]]
    gap = [rows[label]["tasks"][t]["value"] - rows["dense"]["tasks"][t]["value"] for t in tasks[1:]]
    assert without["n"] == sum(counts)
    assert without["difference"] == pytest.approx(sum(g * n for g, n in zip(gap, counts)) / sum(counts))
    assert (tmp_path / "table" / "healing-table-paired.png").stat().st_size > 10_000
    with pytest.raises(ConfigError, match="--ours names rows that do not exist"):
        heal_table["main"](["--run", str(out), "--ours", "nobody", "--out", str(tmp_path / "x")])


def test_reviewer_rows_are_refused_at_another_k_on_other_documents_or_against_another_table(tiny_run, tiny_dir,
                                                                                           tmp_path):
    from pudding.evaluation.zero_shot import EvalConfig, evaluate

    baselines_table = _baselines_table()
    _, config, _ = tiny_run
    main = json.loads((config.folder / "main.json").read_text())
    tasks = tuple(main["metrics"])
    evaluate(EvalConfig(model=tiny_dir, tasks=tasks, omissions=((1,), (1, 2)), limit=main["budget"]["paper_tasks"] - 1,
                        output_dir=str(tmp_path / "short"), progress=False))
    measure = baselines_table.measure
    with pytest.raises(ConfigError, match="removes 1 blocks, the table is at k=2"):
        measure(config.folder, [ExternalRow.parse(f"one={tmp_path / 'short'}#omit 1")])
    with pytest.raises(ConfigError, match=f"lacks {len(tasks)} of the table's"):
        measure(config.folder, [ExternalRow.parse(f"two={tmp_path / 'short'}#omit 1,2")])
    with pytest.raises(ConfigError, match="has rows"):
        measure(config.folder, [ExternalRow.parse(f"two={tmp_path / 'short'}")])
    with pytest.raises(ConfigError, match="NAME=EVAL"):
        ExternalRow.parse("no-path")
    # a table whose saved scores no longer give its rows is not extended
    copy = tmp_path / "table"
    shutil.copytree(config.folder, copy)
    main["rows"]["sleb"]["average"] += 0.01
    (copy / "main.json").write_text(json.dumps(main))
    with pytest.raises(ConfigError, match="row 'sleb' recomputes to"):
        measure(copy, [])
    assert blocks_removed({"model": {"num_blocks": 4}}, {"omitted": []}, 6) == 2


def test_a_tables_static_rows_are_found_by_their_blocks_whatever_the_scores_call_them():
    """Scores shared with a depth ladder name sets their own way ("sleb-ppl-k3"), and a set that two sources
    share is stored once under one name: the columns come from the table's baselines by blocks, and by name only
    for a run without a baselines folder."""
    from pudding.evaluation.external import TableDocuments

    def docs(baseline_sets):
        return TableDocuments(main={}, tasks=[], doc_ids=[], golds=[], texts=[], correct=[],
                              set_names=["dense", "arc_easy-tl-k3", "winogrande-tl-k3", "sleb-ppl-k3"],
                              sets=[(), (7, 18, 19), (12, 14, 17), (16, 17, 18)], num_blocks=30,
                              baseline_sets=baseline_sets)

    ladder = docs({"sleb": (16, 17, 18), "shortened_ppl": (12, 14, 17), "shortgpt": (13, 14, 17)})
    assert [ladder.column(row) for row in ("dense", "sleb", "shortened_ppl", "shortgpt")] == [0, 3, 2, None]
    by_name = docs({})
    assert [by_name.column(row) for row in ("dense", "sleb", "shortened_ppl")] == [0, None, None]
