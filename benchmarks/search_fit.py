"""Does a greedy search's set stay good beyond the documents it searched on? Judged on calibration labels alone.

Each greedy search reads the first ``samples`` calibration documents of its task (``sample_ids`` in the pool).
A label run usually scores more of that task's calibration prompts, the searched ones among them. So every
searched set can be scored twice on its own task, with its lm-eval metric:

- ``searched``: on the documents the search read (where it had every chance to look good);
- ``held-out``: on the task's other labelled prompts, which no search read.

Each is set against the best static baseline set (the one of SLEB, Shortened-LLaMA PPL/Taylor+ and ShortGPT
with the best mean of per-task accuracies over all the calibration labels), on the same prompts, with a paired
95% interval on the held-out difference. A set that beats the static one where it searched but not beyond
has fitted its few documents: more documents, or an objective closer to accuracy, is what it lacks.

No evaluation document is read.

    .venv/bin/python benchmarks/search_fit.py --labels results/smollm2/medium-choice-prob/k6/labels \\
        --pool results/smollm2/pool-128 --pool results/smollm2/choice-prob-64 --out results/.../search-fit.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from pudding.core.errors import PuddingError
from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.tables import best_by, macro_mean
from pudding.pool.artifact import CandidatePool
from pudding.routing.labels import Labels
from pudding.routing.train import routing_data

BASELINE_NAMES = ("sleb-ppl", "shortened_ppl", "taylor", "shortgpt")


def paired_interval(differences: torch.Tensor) -> tuple[float, float, float]:
    """Mean of per-prompt differences and its normal 95% interval."""
    n = len(differences)
    mean = float(differences.mean())
    half = 1.96 * float(differences.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return mean, mean - half, mean + half


def best_static(correct: torch.Tensor, tasks: list[str], candidates: list[int]) -> int:
    """The column among ``candidates`` with the best mean of per-task accuracies."""
    rows = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
    return best_by(macro_mean(correct, rows), candidates)


def fit(correct: torch.Tensor, tasks: list[str], doc_ids: list[str], column: int, static: int, task: str,
        searched_ids: set[str]) -> dict:
    """One searched set on its task: accuracy where the search looked and on the other prompts, against
    ``static`` on the same prompts."""
    searched = [i for i, (t, d) in enumerate(zip(tasks, doc_ids)) if t == task and d in searched_ids]
    held_out = [i for i, (t, d) in enumerate(zip(tasks, doc_ids)) if t == task and d not in searched_ids]
    if not searched or not held_out:
        raise ValueError(f"{task}: the labels hold {len(searched)} searched and {len(held_out)} other prompts; "
                         "both are needed")
    out = {"n_searched": len(searched), "n_held_out": len(held_out)}
    for part, rows in (("searched", searched), ("held_out", held_out)):
        out[part] = {"set": float(correct[rows, column].mean()), "static": float(correct[rows, static].mean())}
    mean, low, high = paired_interval(correct[held_out, column] - correct[held_out, static])
    out["held_out_minus_static"] = {"mean": mean, "low": low, "high": high}
    return out


def searched_sets(pools: list[CandidatePool], set_columns: dict[tuple, int]) -> list[tuple[int, object]]:
    """(label column, greedy source) for every greedy search whose set the labels scored."""
    found = []
    for pool in pools:
        for entry in pool.sets:
            column = set_columns.get(tuple(entry.blocks))
            found += [(column, s) for s in entry.sources if s.method == "greedy" and column is not None]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="a label artifact (pudding label, or a reproduce run's)")
    parser.add_argument("--pool", action="append", required=True, help="a pool whose searches to check (repeat)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        labels = Labels.load(args.labels)
        pools = [CandidatePool.from_pretrained(p) for p in args.pool]
        data = routing_data(labels, "tl")
    except PuddingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = labels.meta.get("set_names") or [str(s) for s in labels.meta["sets"]]
    columns = {tuple(blocks): j for j, blocks in enumerate(labels.meta["sets"])}
    baselines = [j for j, name in enumerate(names) if name in BASELINE_NAMES]
    if not baselines:
        print(f"error: {args.labels} scores none of the static baselines {', '.join(BASELINE_NAMES)}",
              file=sys.stderr)
        return 2
    static = best_static(data.correct, data.tasks, baselines)
    doc_ids = [str(d) for d in labels.table["doc_id"]]
    rows, labelled_tasks = [], set(data.tasks)
    print(f"best static baseline on calibration: {names[static]}")
    print(f"{'search':32s} {'n':>8s} {'searched: set/static':>22s} {'held-out: set/static':>22s}  "
          "held-out minus static")
    for column, source in searched_sets(pools, columns):
        if source.task not in labelled_tasks:
            continue
        result = fit(data.correct, data.tasks, doc_ids, column, static, source.task, set(source.sample_ids))
        result.update(task=source.task, objective=source.objective, set=names[column],
                      blocks=list(labels.meta["sets"][column]))
        rows.append(result)
        d = result["held_out_minus_static"]
        print(f"{source.task + ' ' + source.objective:32s} {result['n_searched']:3d}/{result['n_held_out']:<4d} "
              f"{result['searched']['set']:10.3f}/{result['searched']['static']:.3f}      "
              f"{result['held_out']['set']:10.3f}/{result['held_out']['static']:.3f}      "
              f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    if args.out:
        atomic_write_json(Path(args.out), {"labels": args.labels, "pools": args.pool, "best_static": names[static],
                                           "searches": rows, "config": vars(args), "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
