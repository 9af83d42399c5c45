"""lm-evaluation-harness (through the pudding plugin) against `pudding eval`, dense SmolLM2, six tasks.

lm-eval runs its own task definitions on the local data (`pudding lm-eval-tasks`), on the first ``--limit``
documents of each validation split; `pudding eval` runs its registry on a seeded sample of its evaluation
half of the same split. The documents differ, so the two agree when their difference is within the
standard errors; the table prints the difference in standard errors.

    .venv/bin/python benchmarks/compare_lm_eval.py --limit 200 --out results/smollm2/lm_eval_vs_pudding.json
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import lm_eval
from lm_eval.tasks import TaskManager

from pudding.core.load import load_model
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.tasks import get_task
from pudding.evaluation.lm_eval_plugin import PuddingLM, write_local_tasks
from pudding.evaluation.zero_shot import EvalConfig, evaluate

TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("default")
    with tempfile.TemporaryDirectory() as folder:
        write_local_tasks(folder)
        lm = PuddingLM(pretrained="default", omit="none", model=model, tokenizer=tokenizer)
        theirs = lm_eval.simple_evaluate(model=lm, tasks=[f"{t}_local" for t in TASKS], limit=args.limit,
                                         task_manager=TaskManager(include_path=folder))["results"]
    ours = evaluate(EvalConfig(tasks=",".join(TASKS), omissions=("",), limit=args.limit, output_dir=None,
                               progress=False), model=model, tokenizer=tokenizer)["runs"][0]["tasks"]
    rows = {}
    print(f"{'task':<15}{'metric':<10}{'lm-eval':>16}{'pudding eval':>18}{'diff/SE':>9}")
    for task in TASKS:
        metric = get_task(task).metric
        a, a_se = theirs[f"{task}_local"][f"{metric},none"], theirs[f"{task}_local"][f"{metric}_stderr,none"]
        b, b_se = ours[task][metric]["value"], ours[task][metric]["stderr"]
        z = (a - b) / math.sqrt(a_se ** 2 + b_se ** 2)
        rows[task] = {"metric": metric, "lm_eval": a, "lm_eval_stderr": a_se, "pudding": b, "pudding_stderr": b_se,
                      "difference_in_stderr": z, "n_pudding": ours[task][metric]["n"]}
        print(f"{task:<15}{metric:<10}{a:>9.3f} ± {a_se:.3f}{b:>11.3f} ± {b_se:.3f}{z:>9.2f}")
    if args.out:
        atomic_write_json(Path(args.out), {"limit": args.limit, "tasks": rows, "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
