"""How much a per-task choice of set could gain over one static set, judged on calibration labels alone.

Routing can only beat the best static set if some task answers better under another set of the pool. This
splits each task's labelled calibration prompts in two halves at random, makes every choice on one half
and scores it on the other, and repeats:

- ``best static``: the one set with the best mean of per-task accuracies (each task's lm-eval metric);
- ``task-best by accuracy``: per task, the set with the best accuracy (what a router that knows the task and
  aims at accuracy can reach);
- ``task-best by TL``: per task, the set with the best mean gold log-likelihood (the paper's label);
- ``oracle``: per prompt, any set that answers it (an upper bound no router reaches).

The dense model, which label runs score as a reference, is never a choice.

No evaluation document is read, so the numbers can guide the pool's design without spending the test set.

    .venv/bin/python benchmarks/pool_headroom.py --labels results/.../labels --out results/smollm2/headroom.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pudding.core.errors import PuddingError
from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.tables import macro_mean
from pudding.routing.labels import Labels
from pudding.routing.train import routing_data

CHOICES = ("best static", "task-best by accuracy", "task-best by TL", "oracle")


def split_halves(tasks: list[str], generator: torch.Generator) -> tuple[dict, dict]:
    """Per task, a random half of its rows and the other half."""
    first, second = {}, {}
    for task in sorted(set(tasks)):
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == task])
        rows = rows[torch.randperm(len(rows), generator=generator)]
        first[task], second[task] = rows[: len(rows) // 2], rows[len(rows) // 2:]
    return first, second


def one_split(correct: torch.Tensor, tl: torch.Tensor, first: dict, second: dict) -> dict[str, float]:
    """Every choice made on ``first`` and scored on ``second``: the mean over tasks of the task's accuracy."""
    tasks = sorted(first)
    accuracy = {t: correct[first[t]].mean(0) for t in tasks}  # per set, on the choosing half
    static = int(macro_mean(correct, first).argmax())
    by_accuracy = {t: int(accuracy[t].argmax()) for t in tasks}
    by_tl = {t: int(tl[first[t]].mean(0).argmax()) for t in tasks}

    def held_out(choice: dict[str, int]) -> float:
        return sum(float(correct[second[t], choice[t]].mean()) for t in tasks) / len(tasks)

    oracle = sum(float(correct[second[t]].max(1).values.mean()) for t in tasks) / len(tasks)
    return {"best static": held_out(dict.fromkeys(tasks, static)), "task-best by accuracy": held_out(by_accuracy),
            "task-best by TL": held_out(by_tl), "oracle": oracle}


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": sum(values) / len(values), "p05": ordered[int(0.05 * (len(values) - 1))],
            "p95": ordered[int(0.95 * (len(values) - 1))]}


def headroom(correct: torch.Tensor, tl: torch.Tensor, tasks: list[str], repeats: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    runs = [one_split(correct, tl, *split_halves(tasks, generator)) for _ in range(repeats)]
    out = {name: summarize([r[name] for r in runs]) for name in CHOICES}
    out["task-best by accuracy minus best static"] = summarize(
        [r["task-best by accuracy"] - r["best static"] for r in runs])
    out["task-best by TL minus best static"] = summarize([r["task-best by TL"] - r["best static"] for r in runs])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, help="a label artifact (pudding label, or a reproduce run's)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        labels = Labels.load(args.labels)
        data = routing_data(labels, "tl")
    except PuddingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    names = labels.meta.get("set_names") or [str(s) for s in labels.meta["sets"]]
    # the dense model is labelled as a reference, but it is not a pruned set: no choice may fall on it
    pruned = [j for j, blocks in enumerate(labels.meta["sets"]) if blocks]
    names = [names[j] for j in pruned]
    correct, tl = data.correct[:, pruned], data.labels[:, pruned]
    per_task = {t: {name: float(correct[[i for i, x in enumerate(data.tasks) if x == t], j].mean())
                    for j, name in enumerate(names)} for t in sorted(set(data.tasks))}
    for task, by_set in per_task.items():
        best = max(by_set, key=by_set.get)
        print(f"{task:14s} n={data.tasks.count(task):4d}  best {best} {by_set[best]:.3f}")
    result = headroom(correct, tl, data.tasks, args.repeats, args.seed)
    for name, summary in result.items():
        print(f"{name:42s} {summary['mean']:+.4f}  [{summary['p05']:+.4f}, {summary['p95']:+.4f}]")
    if args.out:
        atomic_write_json(Path(args.out), {"labels": args.labels, "sets": names, "per_task_accuracy": per_task,
                                           "split_half": result, "config": vars(args), "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
