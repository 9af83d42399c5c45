"""The smallest paired difference each reproduction budget can detect, from a measured paired spread.

A paired difference over N documents has standard error sd / sqrt(N), where sd is the per-document spread
of (ours - other), which is in [-1, 1]. This reads sd back from a ``main.json`` (stderr x sqrt(n) of each
paired difference), then prints for every budget the half-width of the 95% interval (1.96 sd / sqrt(N))
and the smallest true difference detected 80% of the time by a two-sided 5% test ((1.96 + 0.84) sd / sqrt(N)).

    .venv/bin/python scripts/power.py results/smollm2/small/k6/main.json --out results/smollm2/power.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.tasks import PAPER_TASKS
from pudding.evaluation.reproduce import BUDGETS


def paired_spreads(main: dict) -> dict[str, float]:
    """Per-document sd of every paired difference recorded in a main table (any layout since stop 11)."""
    found = main["paired_differences"]
    nested = all(isinstance(v, dict) and "difference" not in v for v in found.values())
    pairs = {f"{ours} - {other}": d for ours, rows in found.items() for other, d in rows.items()} if nested else found
    return {name: (d["ci95"][1] - d["difference"]) / 1.96 * math.sqrt(d["n"]) for name, d in pairs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("main_json")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    spreads = paired_spreads(json.loads(Path(args.main_json).read_text()))
    sd = statistics.median(spreads.values())
    rows = {}
    for name, budget in BUDGETS.items():
        n = budget.paper_docs * len(PAPER_TASKS)
        rows[name] = {"documents": n, "ci95_half_width": 1.96 * sd / math.sqrt(n),
                      "detectable_80pct_power": (1.96 + 0.84) * sd / math.sqrt(n)}
    print(f"per-document sd of the paired differences in {args.main_json}: median {sd:.3f} "
          f"(range {min(spreads.values()):.3f} to {max(spreads.values()):.3f}, {len(spreads)} pairs)")
    for name, row in rows.items():
        print(f"{name:>7}: N = {row['documents']:>4}, 95% interval +/- {row['ci95_half_width']:.3f}, "
              f"detects {row['detectable_80pct_power']:.3f} with 80% power")
    if args.out:
        atomic_write_json(Path(args.out), {"source": args.main_json, "sd_median": sd, "sd_per_pair": spreads,
                                           "budgets": rows, "provenance": provenance()})


if __name__ == "__main__":
    main()
