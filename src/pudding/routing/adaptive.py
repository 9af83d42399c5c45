"""Adaptive depth: each prompt skips as many blocks as its predicted quality allows.

A depth-ladder pool (:func:`pudding.pool.artifact.ladder_pool`) holds sets at several depths k, e.g. every
search's first 3, 6 and 9 removals, the static baselines at the same k, and optionally the dense model
(k=0). A router trained on it (the usual ``pudding label`` + ``pudding train-router``, unchanged) predicts
every set's score for a prompt. A request then carries a ``tolerance`` >= 0, the largest predicted drop it
accepts, and :func:`choose_by_tolerance` picks the deepest set within it.

**The reference** of the drop is the predicted score of the dense set when the ladder has one, otherwise of
the best predicted set at the smallest k. **Units** are the router's: its label target (``tl``: the gold
answer's mean per-token log-likelihood, in nats) times nothing else, since an ``mse`` router's scores are
scaled back to label units. A ``ce`` router outputs logits, which are no drop of anything, so tolerance
routing refuses it.

:func:`adaptive_curve` computes the measurement (accuracy against the mean number of blocks skipped) from
per-document correctness, so the LLM never runs again; ``benchmarks/adaptive_curve.py`` loads the data,
writes the JSON and draws the plot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pudding.core.errors import ConfigError
from pudding.core.metrics import mean_with_stderr

TOLERANCE_HEADER = "X-Pudding-Tolerance"


# --- the choice rule ---------------------------------------------------------------------------------------


def check_tolerance(value: Any) -> float:
    """``value`` as a float; ConfigError unless it is a finite number >= 0 (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"tolerance must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"tolerance must be a finite number >= 0, got {value!r}")
    return float(value)


def reference_scores(scores: torch.Tensor, depths: Sequence[int]) -> torch.Tensor:
    """Per row of ``scores`` (prompts x sets), the reference of the drop: the dense set's score if a set has
    depth 0, else the best score among the sets at the smallest depth. Shape (prompts,)."""
    depth = torch.as_tensor(depths)
    shallow = depth == depth.min()
    return scores.masked_fill(~shallow, -math.inf).max(1).values


def choose_by_tolerance(scores: torch.Tensor, depths: Sequence[int], tolerance: float,
                        available: Sequence[int] | None = None) -> torch.Tensor:
    """The set each prompt routes to under ``tolerance``: the deepest set (most blocks skipped) whose predicted
    drop from the reference (:func:`reference_scores`) is at most ``tolerance``; among the deepest, the best
    predicted score (then the first index). A row where nothing fits (only possible for a negative tolerance,
    NaN predictions, or when the reference set is not ``available``) gets the best set at the smallest depth.

    ``scores``: (prompts, sets) predicted scores; ``depths``: each set's k; ``available``: the indices that may
    be chosen (default all). The reference is always taken over every set, so a tolerance means the same
    drop whichever sets a deployment serves (the gateway serves only the sets that have a backend).
    Returns (prompts,) set indices.

    >>> choose_by_tolerance(torch.tensor([[0.0, -0.1, -0.5]]), [0, 3, 6], 0.2).tolist()
    [1]
    >>> choose_by_tolerance(torch.tensor([[0.0, -0.1, -0.5]]), [0, 3, 6], 0.2, available=[0, 2]).tolist()
    [0]
    """
    depth = torch.as_tensor(depths, dtype=torch.long).expand_as(scores)
    can = torch.ones(scores.shape[1], dtype=torch.bool)
    if available is not None:
        can = torch.zeros_like(can)
        can[list(available)] = True
    fits = ((reference_scores(scores, depths)[:, None] - scores) <= tolerance) & can
    deepest = torch.where(fits, depth, -1).max(1, keepdim=True).values
    chosen = fits & (depth == deepest)
    fallback = can & (depth == depth.masked_fill(~can, torch.iinfo(torch.long).max).min(1, keepdim=True).values)
    chosen = torch.where(fits.any(1, keepdim=True), chosen, fallback)
    return scores.masked_fill(~chosen, -math.inf).argmax(1)


def check_adaptive(depths: Sequence[int], loss: str) -> None:
    """ConfigError unless tolerance routing applies: sets at more than one depth, and a router whose scores
    predict each set's label (``mse``), so that their differences are predicted drops."""
    if len(set(depths)) < 2:
        raise ConfigError(f"tolerance needs a depth ladder (sets at several k), but every set of this artifact "
                          f"skips {depths[0] if depths else 0} blocks; build one with `pudding ladder`")
    if loss != "mse":
        raise ConfigError(f"tolerance needs a router that predicts each set's score (loss mse); this one was "
                          f"trained with {loss!r}, whose outputs are no predicted drop")


# --- the measurement ---------------------------------------------------------------------------------------


def task_average(values: torch.Tensor, tasks: Sequence[str]) -> float:
    """Mean over tasks of each task's mean of ``values`` (the main table's "average": tasks weigh equally)."""
    by_task: dict[str, list[float]] = {}
    for value, task in zip(values.tolist(), tasks):
        by_task.setdefault(task, []).append(value)
    return sum(sum(v) / len(v) for v in by_task.values()) / len(by_task)


def paired_difference(ours: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    """Mean per-document difference ``ours - other`` with a normal 95% interval (as the main table's)."""
    stats = mean_with_stderr((ours - other).tolist())
    half = 1.96 * stats.stderr
    return {"difference": stats.value, "ci95": [stats.value - half, stats.value + half], "n": stats.n}


def _point(right: torch.Tensor, k: torch.Tensor, tasks: Sequence[str]) -> dict[str, float]:
    """One curve point from each document's correctness (0/1) and blocks skipped."""
    return {"mean_k": k.double().mean().item(), "accuracy": task_average(right, tasks),
            "accuracy_per_document": right.double().mean().item()}


def tolerance_breakpoints(scores: torch.Tensor, depths: Sequence[int]) -> list[float]:
    """Every tolerance at which some prompt's choice can change (0 and each non-negative predicted drop),
    sorted: the mean k is a step function of the tolerance with its steps among these."""
    drops = reference_scores(scores, depths)[:, None] - scores
    return sorted({0.0, *drops[drops > 0].tolist()})


def _smallest_reaching(k: float, breakpoints: list[float], mean_k) -> float | None:
    """The smallest breakpoint tolerance whose mean k is at least ``k`` (bisection: mean k only grows with
    the tolerance, since a larger tolerance only admits more sets); None if even the largest falls short."""
    lo, hi = 0, len(breakpoints) - 1
    if mean_k(breakpoints[hi]) < k - 1e-12:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_k(breakpoints[mid]) >= k - 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return breakpoints[lo]


def fixed_k_choices(scores: torch.Tensor, depths: Sequence[int], k: int) -> torch.Tensor:
    """PuDDing at a fixed k: per prompt, the router's best predicted set among those that skip ``k`` blocks."""
    return scores.masked_fill(torch.as_tensor(depths)[None, :] != k, -math.inf).argmax(1)


def adaptive_curve(scores: torch.Tensor, depths: Sequence[int], correct: torch.Tensor, columns: Sequence[int],
                   tasks: Sequence[str], statics: Mapping[str, Mapping[int, int]], dense: int | None = None,
                   points: int = 41) -> dict[str, Any]:
    """Accuracy against the mean number of blocks skipped, for the adaptive router and every static row.

    Args:
        scores: (documents, R) the router's predictions for its R ladder sets on the evaluation prompts.
        depths: each of the R sets' k.
        correct: (documents, C) 1.0 where a scored set answers the document correctly (the task's metric).
        columns: for each of the R router sets, its column in ``correct``.
        tasks: each document's task (accuracy is the average over tasks, as in the main table).
        statics: name -> {k: column of ``correct``}: one static method's set at each k (SLEB, ShortGPT, ...).
        dense: the dense model's column of ``correct``, if scored.
        points: tolerances drawn on the adaptive curve (spread over the breakpoints; 0 and the last included).

    Returns a JSON-able dict: ``adaptive`` (tolerance, mean_k, accuracy per point), ``static`` curves,
    ``fixed`` (the same router restricted to the sets at each k: PuDDing at a fixed k), ``dense``, and
    ``matched``: for every static and fixed-k point, the smallest tolerance whose mean k reaches that k and
    the paired difference adaptive minus that row over the documents, with its 95% interval. The tolerance is
    matched on mean k alone, which depends on the router's predictions and never on the answers.
    ``versus_mixture``: every adaptive point against every row mixed to exactly its mean k (:func:`mixture_of`;
    dense is each row's point at k=0), with the paired difference and its interval.
    """
    n, depth = len(scores), torch.as_tensor(depths, dtype=torch.long)
    if scores.shape[1] != len(depths) or len(columns) != len(depths) or len(correct) != n or len(tasks) != n:
        raise ConfigError(f"shapes disagree: scores {tuple(scores.shape)}, {len(depths)} depths, {len(columns)} "
                          f"columns, correct {tuple(correct.shape)}, {len(tasks)} tasks")
    rows, column = torch.arange(n), torch.as_tensor(columns, dtype=torch.long)
    cache: dict[float, torch.Tensor] = {}

    def chosen_at(t: float) -> torch.Tensor:  # router set index per document
        if t not in cache:
            cache[t] = choose_by_tolerance(scores, depths, t)
        return cache[t]

    def mean_k(t: float) -> float:
        return depth[chosen_at(t)].double().mean().item()

    def routed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return correct[rows, column[chosen]], depth[chosen]

    def constant(col: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return correct[:, col], torch.full((n,), k)

    breaks = tolerance_breakpoints(scores, depths)
    picks = sorted({breaks[round(i * (len(breaks) - 1) / max(points - 1, 1))] for i in range(points)})
    rows_at: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {
        name: {k: constant(col, k) for k, col in sorted(by_k.items())} for name, by_k in statics.items()}
    rows_at[FIXED_ROW] = {k: routed(fixed_k_choices(scores, depths, k)) for k in sorted(set(depths)) if k > 0}
    out: dict[str, Any] = {
        "documents": n, "depths": sorted(set(depths)),
        "adaptive": [{"tolerance": t, **_point(*routed(chosen_at(t)), tasks)} for t in picks],
        "static": {name: [{"k": k, **_point(*pair, tasks)} for k, pair in by_k.items()]
                   for name, by_k in rows_at.items() if name != FIXED_ROW},
        "fixed": [{"k": k, **_point(*pair, tasks)} for k, pair in rows_at[FIXED_ROW].items()],
        "matched": [_matched(name, k, right, breaks, mean_k, lambda t: routed(chosen_at(t))[0], tasks)
                    for name, by_k in rows_at.items() for k, (right, _) in by_k.items()]}
    if dense is not None:
        out["dense"] = {"k": 0, **_point(*constant(dense, 0), tasks)}
        for by_k in rows_at.values():  # every static row starts at the dense model: skipping 0 blocks
            by_k[0] = constant(dense, 0)
    out["versus_mixture"] = [
        _versus_mixture(name, {k: right for k, (right, _) in by_k.items()}, t, mean_k(t), routed(chosen_at(t))[0],
                        tasks)
        for t in picks for name, by_k in rows_at.items()]
    out["versus_mixture"] = [m for m in out["versus_mixture"] if m is not None]
    return out


FIXED_ROW = "PuDDing, fixed k"


def _matched(name: str, k: int, right: torch.Tensor, breaks: list[float], mean_k, adaptive_right,
             tasks: Sequence[str]) -> dict[str, Any]:
    """Adaptive minus one row at the smallest tolerance whose mean k is at least that row's k."""
    t = _smallest_reaching(k, breaks, mean_k)
    if t is None:
        return {"row": name, "k": k, "tolerance": None, "reason": "no tolerance reaches this mean k"}
    ours = adaptive_right(t)
    return {"row": name, "k": k, "tolerance": t, "adaptive_mean_k": mean_k(t),
            "adaptive_accuracy": task_average(ours, tasks), "row_accuracy": task_average(right, tasks),
            **paired_difference(ours, right)}


def mixture_of(right_at: Mapping[int, torch.Tensor], mean_k: float) -> torch.Tensor | None:
    """Per document, the expected correctness of a static row run at a *mean* depth between two of its k: each
    prompt skips the deeper rung's blocks with probability p and the shallower's otherwise, p chosen so the mean
    k is ``mean_k``. That is the straight line between the row's neighbouring points, which any static method can
    reach by mixing at random, so it is the static curve an adaptive point must beat at the same mean k. None
    outside the row's depths."""
    ks = sorted(right_at)
    if not ks or not ks[0] - 1e-9 <= mean_k <= ks[-1] + 1e-9:
        return None
    hi = next((k for k in ks if k >= mean_k - 1e-9), ks[-1])
    lo = max((k for k in ks if k <= mean_k + 1e-9), default=hi)
    if hi == lo:
        return right_at[lo].double()
    p = (mean_k - lo) / (hi - lo)
    return (1 - p) * right_at[lo].double() + p * right_at[hi].double()


def _versus_mixture(name: str, right_at: Mapping[int, torch.Tensor], tolerance: float, mean_k: float,
                    ours: torch.Tensor, tasks: Sequence[str]) -> dict[str, Any] | None:
    """One adaptive point against one static row mixed to the same mean k (:func:`mixture_of`)."""
    theirs = mixture_of(right_at, mean_k)
    if theirs is None:
        return None
    return {"row": name, "tolerance": tolerance, "mean_k": mean_k, "adaptive_accuracy": task_average(ours, tasks),
            "row_accuracy": task_average(theirs, tasks), **paired_difference(ours.double(), theirs)}


def plot_curve(curve: dict[str, Any], path: str | Path, title: str) -> None:
    """Accuracy against mean blocks skipped: the adaptive curve, each static method, fixed-k PuDDing, dense."""
    from pudding.core.extras import pyplot

    plt = pyplot()

    from pudding.core.provenance import atomic_write_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    adaptive = curve["adaptive"]
    ax.plot([p["mean_k"] for p in adaptive], [p["accuracy"] for p in adaptive], "-", color="black", lw=2,
            label="PuDDing, adaptive (tolerance sweep)")
    # each static row's line starts at dense: the lines between points are what random mixing of depths reaches
    start = [curve["dense"]] if "dense" in curve else []
    for name, points in [*curve["static"].items(), ("PuDDing, fixed k", curve["fixed"])]:
        points = start + points
        ax.plot([p["mean_k"] for p in points], [p["accuracy"] for p in points], "o--", label=name)
    if "dense" in curve:
        ax.plot([0], [curve["dense"]["accuracy"]], "k*", markersize=12, label="dense")
    ax.set(xlabel="mean blocks skipped per prompt", ylabel="average accuracy over tasks", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, path)


# --- label artifacts that cover the ladder -----------------------------------------------------------------


def combine_labels(folders: Sequence[str | Path], pool) -> Any:
    """One :class:`~pudding.routing.labels.Labels` with a column per set of ``pool``, in its order, each taken from the
    first of ``folders`` that labelled that set. Every folder must hold the same documents, in the same order
    (e.g. the k=3 and the k=6 scores of one reproduction). Nothing is scored again; ConfigError if a set was
    never labelled or the documents differ."""
    import datasets

    from pudding.routing.labels import SET_COLUMNS, Labels, _features

    loaded = [Labels.load(f) for f in folders]
    if not loaded:
        raise ConfigError("no label folders given")
    doc_ids = list(loaded[0].table["doc_id"])
    for folder, labels in zip(folders[1:], loaded[1:]):
        if list(labels.table["doc_id"]) != doc_ids:
            raise ConfigError(f"{folder} holds other documents than {folders[0]}; only labels of the same "
                              "documents combine")
    where: dict[tuple, tuple[int, int]] = {}
    for i, labels in enumerate(loaded):
        for j, blocks in enumerate(labels.meta["sets"]):
            where.setdefault(tuple(blocks), (i, j))
    missing = [list(e.blocks) for e in pool.sets if e.blocks not in where]
    if missing:
        raise ConfigError(f"sets {missing} are in none of {[str(f) for f in folders]}; label them first")
    picks = [where[e.blocks] for e in pool.sets]
    columns = loaded[0].table.to_dict()
    for name in SET_COLUMNS:
        per_artifact = [list(labels.table[name]) for labels in loaded]
        columns[name] = [[per_artifact[i][row][j] for i, j in picks] for row in range(len(doc_ids))]
    table = datasets.Dataset.from_dict(columns, features=_features())
    identities = [labels.identity for labels in loaded]
    meta = {**loaded[0].meta, "pool": pool.fingerprint(), "sets": [list(e.blocks) for e in pool.sets],
            "set_names": [e.name for e in pool.sets], "combined_from": [str(f) for f in folders],
            "identity": loaded[0].meta.get("identity") if all(i == identities[0] for i in identities) else None}
    return Labels(table, meta)


def save_labels(labels, out: str | Path) -> Path:
    """Write a (combined) :class:`~pudding.routing.labels.Labels` as a label artifact folder, atomically."""
    from pudding.core.provenance import atomic_write_json, provenance
    from pudding.routing.labels import LABELS_FILE, LABELS_FORMAT, META_FILE, _write_parquet

    folder = Path(out)
    _write_parquet(labels.table.to_dict(), folder / LABELS_FILE)
    atomic_write_json(folder / META_FILE, {**labels.meta, "format": LABELS_FORMAT, "n_docs": len(labels.table),
                                           "provenance": provenance()})
    return folder
