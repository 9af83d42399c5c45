"""benchmarks/quantized_table.py: dense, SLEB and routed PuDDing at fp32 and int8 on the same documents."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pudding.core.errors import ConfigError
from pudding.core.load import load_model, model_fingerprint
from pudding.core.tasks import get_task
from pudding.pool.artifact import DENSE_SOURCE, CandidatePool, PoolEntry, SetSource
from pudding.pool.executor import ModelReplica
from pudding.routing.labels import LabelConfig, build_labels

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import quantized_table  # noqa: E402

SETS = [(), (1, 2), (3,), (2, 4)]  # dense, SLEB, two pool sets


@pytest.fixture(scope="module")
def scores(tiny_dir, tmp_path_factory):
    """Every evaluation document of two tasks (one acc, one acc_norm) scored at fp32 under every set."""
    root = tmp_path_factory.mktemp("quantized-table")
    model, _ = load_model(tiny_dir)
    sleb = SetSource("sleb", None, "ppl", [1, 2], [], [], 0.0)
    entries = [PoolEntry((), (DENSE_SOURCE,)), PoolEntry((1, 2), (sleb,))]
    entries += [PoolEntry(b, (SetSource("greedy", "piqa", "tl", list(b), [], [], 0.0),)) for b in SETS[2:]]
    CandidatePool(tuple(entries), {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)}
                  ).save_pretrained(root / "scoring")
    build_labels(LabelConfig(pool=str(root / "scoring"), out=str(root / "scores"), tasks=("piqa", "arc_challenge"),
                             samples=4, split="evaluation", run_dir=str(root / "label-run"), progress=False))
    return root / "scores"


def _routes(n: int) -> list[tuple[int, ...]]:
    return [SETS[1 + i % 3] for i in range(n)]  # every non-dense set, in turn


def _by_hand(folder: Path, routes: list[tuple[int, ...]]) -> dict[str, float]:
    """Per task, the accuracy of each document's routed set, from the stored log-likelihoods by lm-eval's rule."""
    sets = [tuple(s) for s in json.loads((folder / "labels.json").read_text())["sets"]]
    hits: dict[str, list[float]] = {}
    for row, blocks in zip(pq.read_table(folder / "labels.parquet").to_pylist(), routes):
        lls = row["choice_logprob"][sets.index(blocks)]
        if get_task(row["task"]).metric == "acc_norm":
            lls = [ll / n for ll, n in zip(lls, row["choice_chars"])]
        best = max(range(len(lls)), key=lambda i: (lls[i], -i))
        hits.setdefault(row["task"], []).append(float(best == row["gold"]))
    return {t: statistics.fmean(v) for t, v in hits.items()}


def test_rescoring_at_fp32_gives_back_the_saved_scores_and_the_routed_cells(tiny_dir, scores, tmp_path):
    docs = quantized_table.Documents.load(scores)
    routes = _routes(len(docs.tasks))
    result = quantized_table.measure(docs, routes, ModelReplica(tiny_dir, 512, 256), tmp_path / "run",
                                     shard_size=3, progress=False)
    # the same documents scored again, in other batches, at the same precision: the same answers
    for row in ("dense", "SLEB", "PuDDing"):
        assert result["fidelity"][row]["answer_agreement"] == 1.0
        assert result["fidelity"][row]["max_abs_ll_diff"] < 1e-3
        assert result["rows"][f"{row} none"] == result["rows"][f"{row} fp32"]
    cells = result["rows"]["PuDDing fp32"]["tasks"]
    assert {t: c["value"] for t, c in cells.items()} == pytest.approx(_by_hand(scores, routes))
    assert result["routed_sets"] == {"1 2": 3, "3": 3, "2 4": 2}


def test_int8_rows_resume_from_their_shards_and_refuse_another_run(tiny_dir, scores, tmp_path, monkeypatch):
    docs = quantized_table.Documents.load(scores)
    routes = _routes(len(docs.tasks))
    int8 = ModelReplica(tiny_dir, 512, 256, "int8")
    first = quantized_table.measure(docs, routes, int8, tmp_path / "run", shard_size=3, progress=False)
    assert {"dense int8", "SLEB int8", "PuDDing int8"} <= set(first["rows"])
    against = first["paired_differences"]["PuDDing int8"]
    assert set(against) == {"PuDDing fp32", "dense int8", "SLEB int8"}  # itself at fp32, and the static rows
    diffs = [a - b for a, b in zip(*(quantized_table.correctness(docs, c, lambda i, j: docs.fp32[i][j])
                                     for c in (quantized_table.row_columns(docs, routes)["PuDDing"],
                                               [0] * len(routes))))]
    assert first["paired_differences"]["PuDDing fp32"]["dense fp32"]["difference"] == pytest.approx(
        statistics.fmean(diffs))

    def no_scoring(*args, **kwargs):
        raise AssertionError("a finished shard was scored again")

    monkeypatch.setattr(quantized_table, "score_sets", no_scoring)
    again = quantized_table.measure(docs, routes, int8, tmp_path / "run", shard_size=3, progress=False)
    assert again["rows"] == first["rows"] and again["fidelity"] == first["fidelity"]
    with pytest.raises(ConfigError, match=r"differs in: routes"):
        quantized_table.measure(docs, [SETS[2]] * len(routes), int8, tmp_path / "run", shard_size=3,
                                progress=False)


def test_a_router_over_sets_the_scores_do_not_hold_is_refused(scores):
    docs = quantized_table.Documents.load(scores)
    with pytest.raises(ConfigError, match=r"do not hold: \[\[5, 6\]\]"):
        quantized_table.row_columns(docs, [(5, 6)] * len(docs.tasks))
