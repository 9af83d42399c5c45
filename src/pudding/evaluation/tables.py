"""The reproduction's tables and their statistics, from per-document scores alone (the LLM is not run here).

Every row of a table is one way of choosing, per document, a set of the scoring pool (a column of
:class:`~pudding.routing.train.RoutingData`): a static set, a router, or a bound computed in hindsight. A row
is keyed by its :class:`RowId`; the display label is rendered from the id and never parsed back.
A cell is the mean (and standard error) of the row's per-document 0/1 correctness over one task's
documents; differences between rows are paired per document.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pudding.core.metrics import mean_with_stderr
from pudding.core.tasks import get_task
from pudding.pool.artifact import CandidatePool
from pudding.routing.model import PuddingModel
from pudding.routing.train import RoutingData

# The static rows, in table order: dense, the baselines, then the static choices made on calibration data.
STATIC_ROWS = ("dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "best static set",
               "task-best set", "random pool set")
# Bounds computed in hindsight on the evaluation documents themselves: optimistic, never a method.
BOUNDS = {"pool ceiling": "pool ceiling (optimistic: best set per task on these documents)", "oracle": "oracle"}


@dataclass(frozen=True)
class RowId:
    """What a table row is: the method that chose each document's set, and for PuDDing which router.

    ``method`` is a static row (one of :data:`STATIC_ROWS`), ``"pudding"``, or a bound (:data:`BOUNDS`). For
    PuDDing: ``router`` is the router's name; ``role`` is ``"paper"`` (the paper's router), ``"best variant"``
    (the variant chosen on calibration data) or None (an ablation's router); ``seeds`` routers trained with
    seeds 0..seeds-1 are averaged per document; ``sets``/``size`` restrict the router to the pool sets of one
    search objective / to the ``size`` best sets.

    >>> RowId("pudding", router="embed-mlp-mse", role="paper", seeds=5).label
    'PuDDing (paper: embed-mlp-mse, mean of 5 seeds)'
    """

    method: str
    router: str | None = None
    role: str | None = None
    seeds: int = 1
    sets: str | None = None
    size: int | None = None

    @property
    def kind(self) -> str:
        """``static``, ``bound``, ``pudding`` or ``pudding-seeds`` (a seed mean), as recorded in the tables."""
        if self.method == "pudding":
            return "pudding-seeds" if self.seeds > 1 else "pudding"
        return "bound" if self.method in BOUNDS else "static"

    @property
    def label(self) -> str:
        """The row's name in the JSON and Markdown tables."""
        if self.method != "pudding":
            return BOUNDS.get(self.method, self.method)
        if self.sets is not None:
            return f"PuDDing, {self.sets} sets only ({self.size})"
        if self.size is not None:
            return f"{self.size} sets"
        router = self.router + (f", mean of {self.seeds} seeds" if self.seeds > 1 else "")
        if self.role == "paper":
            return f"PuDDing (paper: {router})"
        if self.role == "best variant":
            return f"PuDDing, best variant ({router})"
        return f"PuDDing ({router})"


def mean_stderr(values: list[float]) -> dict[str, float]:
    """``{"value", "stderr", "n"}`` of ``values`` (lm-eval's standard error)."""
    return asdict(mean_with_stderr(values))


def correct_at(data: RoutingData, chosen: list[int]) -> list[float]:
    """Per document, whether the scoring-pool column chosen for it answers it correctly (0/1)."""
    return [data.correct[i, c].item() for i, c in enumerate(chosen)]


def _restricted_argmax(scores: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    mask = torch.full((scores.shape[1],), float("-inf"))
    mask[allowed] = 0.0
    return (scores + mask).argmax(1)


@dataclass(frozen=True)
class Routed:
    """A trained router on one split: its scores and the scoring-pool column of each of its sets."""

    pudding: PuddingModel
    scores: torch.Tensor  # documents x the router's sets
    columns: list[int]

    def chosen(self, allowed: list[int] | None = None) -> list[int]:
        """Scoring-pool column per document: the router's own choice (safe routing included), or its argmax
        restricted to the sets at ``allowed`` (the ablations that shrink the paper's pool)."""
        picks = (self.pudding.router.choose(self.scores) if allowed is None
                 else _restricted_argmax(self.scores, allowed))
        return [self.columns[int(i)] for i in picks]


def macro_mean(values: torch.Tensor, rows_by_task: dict[str, object]) -> torch.Tensor:
    """Per column, the mean over tasks of each task's mean over its rows: every task weighs the same, however
    many rows it has (the tables' average accuracy)."""
    return torch.stack([values[rows].mean(0) for rows in rows_by_task.values()]).mean(0)


def best_by(values: torch.Tensor, columns: list[int]) -> int:
    """The column among ``columns`` with the highest value (first on ties)."""
    return columns[int(values[columns].argmax())]


@dataclass(frozen=True)
class StaticChoices:
    """The static choices, made on calibration prompts only (scoring-pool columns)."""

    best_tl: int  # the pool set with the best mean gold log-likelihood: the paper's label
    best: int  # the candidate (pool or baseline set) with the best accuracy
    per_task: dict[str, int]  # the best candidate per task by accuracy: a user who knows the task


def static_choices(calibration: RoutingData, train: list[int], pool_columns: list[int], candidates: list[int]
                   ) -> StaticChoices:
    """:class:`StaticChoices` from the calibration rows ``train``; no evaluation document is read."""
    per_task = {}
    for task in dict.fromkeys(calibration.tasks):
        rows = [i for i in train if calibration.tasks[i] == task]
        per_task[task] = best_by(calibration.correct[rows].mean(0), candidates)
    return StaticChoices(best_by(calibration.labels[train].mean(0), pool_columns),
                         best_by(calibration.correct[train].mean(0), candidates), per_task)


def static_columns(data: RoutingData, fixed: dict[str, int], static: StaticChoices, pool_columns: list[int],
                   candidates: list[int], seed: int) -> dict[RowId, list[float]]:
    """Per-document correctness of the fixed rows (``fixed``: dense and each baseline, by column), the static
    choices, the random pool set, the pool ceiling and the oracle."""
    correct = data.correct
    columns = {RowId(name): correct[:, column].tolist() for name, column in fixed.items()}
    columns[RowId("best static TL set")] = correct[:, static.best_tl].tolist()
    columns[RowId("best static set")] = correct[:, static.best].tolist()
    # a task without calibration data (the unseen ones) falls back to the best static set
    columns[RowId("task-best set")] = correct_at(data, [static.per_task.get(t, static.best) for t in data.tasks])
    rng = random.Random(seed)
    columns[RowId("random pool set")] = [correct[i, rng.choice(pool_columns)].item() for i in range(len(data.texts))]
    ceiling = {t: best_by(correct[[i for i, x in enumerate(data.tasks) if x == t]].mean(0), candidates)
               for t in dict.fromkeys(data.tasks)}
    columns[RowId("pool ceiling")] = correct_at(data, [ceiling[t] for t in data.tasks])
    columns[RowId("oracle")] = correct[:, candidates].max(1).values.tolist()
    return columns


def seed_mean(data: RoutingData, routed: list[Routed]) -> list[float]:
    """Per document, the fraction of router seeds whose choice answers it correctly: one router's result with
    the luck of its training seed averaged out."""
    per_seed = [correct_at(data, r.chosen()) for r in routed]
    return [sum(values) / len(per_seed) for values in zip(*per_seed)]


def table(data: RoutingData, columns: dict[RowId, list[float]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """``{"metrics": task -> metric, "rows": label -> {"tasks": task -> cell, "average"}}``: each cell the mean
    and standard error of the row's per-document correctness on that task, the average the tasks' mean."""
    by_task = {t: [i for i, task in enumerate(data.tasks) if task == t] for t in tasks}
    rows = {}
    for row, values in columns.items():
        cells = {t: mean_stderr([values[i] for i in idx]) for t, idx in by_task.items() if idx}
        rows[row.label] = {"tasks": cells, "average": sum(c["value"] for c in cells.values()) / len(cells)}
    return {"metrics": {t: get_task(t).metric for t in tasks}, "rows": rows}


def paired_differences(columns: dict, ours, others: list) -> dict:
    """Mean per-document difference ours - other over all documents, with a normal 95% interval, keyed like
    ``others``."""
    out = {}
    for other in others:
        diffs = [a - b for a, b in zip(columns[ours], columns[other])]
        stats = mean_stderr(diffs)
        half = 1.96 * stats["stderr"]
        out[other] = {"difference": stats["value"], "ci95": [stats["value"] - half, stats["value"] + half],
                      "n": stats["n"]}
    return out


def gap_decomposition(columns: dict[RowId, list[float]], ours: RowId) -> dict[str, dict[str, Any]]:
    """Where PuDDing stands against the best static set, split into steps, each a paired difference.

    ``task-best - best static``: what knowing the task wins when each task's set is chosen on calibration data;
    ``pool ceiling - task-best``: what that choice loses to hindsight (the same choice made on these documents),
    so the ceiling over the best static set bounds any task-level choice from this pool; ``task-best - ours``:
    how much of the task-level choice the router misses (negative when per-prompt routing beats it).
    """
    static, task, ceiling = RowId("best static set"), RowId("task-best set"), RowId("pool ceiling")
    steps = {f"{ours.label} - best static set": (ours, static),
             "task-best set - best static set": (task, static),
             "pool ceiling - best static set": (ceiling, static),
             "pool ceiling - task-best set": (ceiling, task),
             f"task-best set - {ours.label}": (task, ours)}
    return {name: paired_differences(columns, a, [b])[b] for name, (a, b) in steps.items()
            if a in columns and b in columns}


def routing_headroom(data: RoutingData, pool: CandidatePool, pool_columns: list[int],
                     columns: dict[RowId, list[float]], ours: RowId) -> dict[str, Any]:
    """Where routing can matter at all: the documents on which the pool's sets disagree.

    On a document that every set gets right (or every set gets wrong) no choice of set changes the score, so
    the gap between PuDDing, the static sets and the oracle lives entirely on the "mixed" documents.
    How alike the sets are (blocks shared per pair) is the structural reason for a small gap.
    """
    right = data.correct[:, pool_columns]
    all_right, all_wrong = right.min(1).values == 1, right.max(1).values == 0
    mixed = [i for i in range(len(right)) if not (all_right[i] or all_wrong[i])]
    shared = [len(set(a.blocks) & set(b.blocks)) for i, a in enumerate(pool.sets) for b in pool.sets[i + 1:]]
    k = len(pool.sets[0].blocks) if pool.sets else 0
    on_mixed = {row.label: mean_stderr([columns[row][i] for i in mixed]) for row in
                (ours, RowId("best static TL set"), RowId("random pool set")) if row in columns and mixed}
    if mixed:
        on_mixed["pool oracle"] = mean_stderr(right.max(1).values[mixed].tolist())
    return {"documents": len(right), "all_sets_right": int(all_right.sum()), "all_sets_wrong": int(all_wrong.sum()),
            "mixed": len(mixed), "accuracy_on_mixed": on_mixed, "k": k, "pool_sets": len(pool.sets),
            "mean_shared_blocks_per_pair": sum(shared) / len(shared) if shared else float(k)}


def switch_rates(routed: dict[str, Routed], data: RoutingData) -> dict[str, float]:
    """For each safe router, the share of evaluation documents routed away from its default set."""
    rates = {}
    for name, r in routed.items():
        default = r.pudding.router.config.default_set
        if default is not None:
            rates[name] = sum(c != r.columns[default] for c in r.chosen()) / len(data.texts)
    return rates


def _group(row: RowId) -> tuple[int, int]:
    """Table order: static rows (in :data:`STATIC_ROWS` order), then PuDDing, then the bounds."""
    if row.kind == "static":
        return 0, STATIC_ROWS.index(row.method) if row.method in STATIC_ROWS else len(STATIC_ROWS)
    return (2, 0) if row.kind == "bound" else (1, 0)


def split_table(data: RoutingData, columns: dict[RowId, list[float]], tasks: tuple[str, ...], ours: list[RowId],
                pool: CandidatePool, pool_columns: list[int]) -> dict[str, Any]:
    """One split's table (the main table or the unseen tasks): every row, each row's kind, the paired
    differences of each of ``ours`` (the PuDDing rows) against every static row, and the routing headroom
    of ``ours[0]``."""
    ordered = {row: columns[row] for row in sorted(columns, key=_group)}  # stable: ties keep their order
    result = table(data, ordered, tasks)
    result["kinds"] = {row.label: row.kind for row in ordered}
    statics = [row for row in ordered if row.kind == "static"]
    result["paired_differences"] = {row.label: {other.label: d for other, d in
                                                paired_differences(ordered, row, statics).items()}
                                    for row in ours if row in ordered}
    result["headroom"] = routing_headroom(data, pool, pool_columns, ordered, ours[0])
    # The decomposition follows the strongest PuDDing row there is: the best variant's seed mean, else the first.
    best = [row for row in ours if row in ordered and row.role == "best variant"]
    result["decomposition"] = gap_decomposition(ordered, max(best, key=lambda row: row.seeds) if best else ours[0])
    return result


def seed_spread(averages: list[float]) -> dict[str, float]:
    """The spread of one router's average accuracy over its training seeds."""
    return {"seeds": len(averages), "mean": statistics.fmean(averages),
            "sd": statistics.stdev(averages) if len(averages) > 1 else 0.0, "min": min(averages), "max": max(averages)}


def ablation_tables(data: RoutingData, routed: dict[str, Routed], pool: CandidatePool, ranking: list[int],
                    routers: list[str], paper: str, seeds: list[str], selection: dict[str, Any],
                    tasks: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The ablations on one split, every one from the routers' choices on its documents.

    ``routers``: one router per kind and loss (seed 0); ``paper``: the paper's router, ``seeds`` its seeds;
    ``ranking``: the paper router's sets, best first on calibration data (the pool-size ablation keeps the
    top ones); ``selection``: how the best routing variant was chosen (its ``grid`` and ``sized`` routers).
    """
    def rows(names: list[str]) -> dict[RowId, list[float]]:
        return {RowId("pudding", router=name): correct_at(data, routed[name].chosen()) for name in names}

    ablations = {"router": table(data, rows(routers), tasks), "router_seed": table(data, rows(seeds), tasks)}
    ablations["router_seed"]["spread"] = seed_spread([row["average"]
                                                      for row in ablations["router_seed"]["rows"].values()])
    # the candidate-search objective and the pool size: restrict the paper router's choice
    restricted = {}
    for objective in ("tl", "margin"):
        allowed = [i for i, e in enumerate(pool.sets) if any(s.objective == objective for s in e.sources)]
        if allowed:
            row = RowId("pudding", router=paper, role="paper", sets=objective, size=len(allowed))
            restricted[row] = correct_at(data, routed[paper].chosen(allowed))
    ablations["objective"] = table(data, restricted, tasks)
    sizes = {RowId("pudding", router=paper, role="paper", size=size): correct_at(data, routed[paper].chosen(
        ranking[:size])) for size in sorted({1, 3, 5, len(pool.sets)}) if size <= len(pool.sets)}
    ablations["pool_size"] = table(data, sizes, tasks)
    if selection.get("grid"):
        names = selection["grid"] + selection["sized"]
        ablations["routing"] = table(data, rows(names), tasks)
        ablations["routing"]["selection"] = {**selection, "evaluation_switch_rate": switch_rates(
            {name: routed[name] for name in names}, data)}
    return ablations
