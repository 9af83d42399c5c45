"""Accuracy of omission sets on calibration documents that no search saw: compare sets without evaluation data.

The searches read the first ``--samples`` calibration documents of a task (128 at the medium budget) and the
router labels the first 200. This scores the documents after ``--skip`` of them, so a set can be judged on
calibration data it was not chosen on, and the evaluation documents stay untouched. Each set gets the task's
lm-eval metric with its standard error, and every set's paired difference against the first one.

    .venv/bin/python benchmarks/heldout_sets.py --task arc_easy --skip 200 --limit 400 \\
        --sets "dense;13-14-15-16-17-18;7-13-18-19-25-26" --out results/smollm2/heldout/arc_easy.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from pudding.core.errors import PuddingError
from pudding.core.load import load_model
from pudding.core.metrics import METRICS
from pudding.core.omit import parse_omission
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer
from pudding.core.tasks import get_task, load_docs
from pudding.routing.labels import score_sets


def paired(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a - b with its standard error (paired over documents) and a 95% normal interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
    return {"mean": mean, "se": se, "low": mean - 1.96 * se, "high": mean + 1.96 * se}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", required=True)
    parser.add_argument("--skip", type=int, required=True, help="calibration documents to leave out (searched ones)")
    parser.add_argument("--limit", type=int, default=400, help="documents to score after the skipped ones")
    parser.add_argument("--sets", required=True, help="';'-separated omission sets (dense, or blocks like 3,4,5)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model)
        total = model.config.num_hidden_layers
        sets = [parse_omission(text.replace("-", ","), total).blocks for text in args.sets.split(";")]
        task = get_task(args.task)
        docs = load_docs(args.task, "calibration", limit=args.skip + args.limit)[args.skip:]
        if len(docs) < 2:
            raise PuddingError(f"{args.task} has only {args.skip + len(docs)} calibration documents; lower --skip")
        start = time.perf_counter()
        per_set = score_sets(LikelihoodScorer(model, tokenizer), docs, sets)
        seconds = time.perf_counter() - start
    except PuddingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = METRICS[task.metric]
    correct = [[metric(doc) for doc in set_scores] for set_scores in per_set]
    rows = []
    for blocks, values in zip(sets, correct):
        mean = sum(values) / len(values)
        rows.append({"set": list(blocks), task.metric: mean, "se": math.sqrt(mean * (1 - mean) / len(values)),
                     "minus_first": paired(values, correct[0])})
        print(f"{','.join(map(str, blocks)) or 'dense':24s} {task.metric} {mean:.3f} (se {rows[-1]['se']:.3f})  "
              f"minus first {rows[-1]['minus_first']['mean']:+.3f} [{rows[-1]['minus_first']['low']:+.3f}, "
              f"{rows[-1]['minus_first']['high']:+.3f}]")
    last = args.skip + len(docs) - 1
    print(f"{len(docs)} documents ({args.skip}..{last} of the calibration split), {seconds:.0f} s")
    if args.out:
        atomic_write_json(Path(args.out), {"task": args.task, "metric": task.metric, "documents": len(docs),
                                           "skip": args.skip, "rows": rows, "seconds": round(seconds, 1),
                                           "config": vars(args), "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
