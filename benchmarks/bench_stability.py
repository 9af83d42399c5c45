"""Do `pudding bench`'s speed ratios hold still? The same bench, run several times, side by side.

Each run times dense, static and routed interleaved in one process (see ``pudding.evaluation.bench``), so drift on a
shared machine hits the three alike. This runs the whole bench ``--runs`` times with one configuration and
prints every speed ratio of every run next to each other, with the largest deviation of a run from the
runs' mean; the aim is within +-5%. Any ratio beyond its compute limit is reported as a measurement error.

    .venv/bin/python benchmarks/bench_stability.py --model default --runs 3 --out results/smollm2/bench-stability.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.bench import BenchConfig, run_bench

SPEED_RATIOS = ("dense_over_routed_prefill", "dense_over_static_prefill", "routed_over_static_prefill",
                "routed_model_only_over_static_prefill")


def ratio_medians(report: dict) -> dict[str, float]:
    """Every speed ratio of one bench run by name (``dense_over_routed_prefill@512``), as its median."""
    ratios = report["ratios"]
    medians = {f"{name}@{n}": summary["median"] for name in SPEED_RATIOS for n, summary in ratios[name].items()}
    medians["dense_over_routed_decode"] = ratios["dense_over_routed_decode"]["median"]
    return medians


def spread(runs: list[dict[str, float]]) -> dict[str, float]:
    """For each ratio, the largest relative deviation of a run from the mean of the runs."""
    return {name: max(abs(run[name] / statistics.mean(r[name] for r in runs) - 1) for run in runs)
            for name in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="PuDDing artifact folder, or 'default'")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="128,256,512")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON file for the runs and their spread")
    args = parser.parse_args()
    config = BenchConfig(model=args.model, lengths=args.lengths, new_tokens=args.new_tokens, repeats=args.repeats,
                         out=None)
    reports = []
    for index in range(args.runs):  # each run is reported and saved as it ends: a killed job keeps its runs
        reports.append(run_bench(config))
        print(f"run {index + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio_medians(reports[-1]).items()),
              flush=True)
        if args.out:
            atomic_write_json(args.out, {"config": vars(args), "runs": [ratio_medians(r) for r in reports],
                                         "reports": reports, "finished": False, "provenance": provenance()})
    runs = [ratio_medians(r) for r in reports]
    deviation = spread(runs)
    print(f"{'ratio':48s}" + "".join(f"{f'run {i + 1}':>9s}" for i in range(len(runs))) + f"{'max dev':>9s}")
    for name in runs[0]:
        print(f"{name:48s}" + "".join(f"{run[name]:9.3f}" for run in runs) + f"{deviation[name]:9.1%}")
    errors = [e for r in reports for e in r["ratios"]["measurement_errors"]]
    print(f"compute limit {reports[0]['ratios']['compute_limit']:.3f}; largest deviation "
          f"{max(deviation.values()):.1%} (aim: within 5%); measurement errors: {len(errors)}")
    for error in errors:
        print(f"  {error}")
    if args.out:
        atomic_write_json(args.out, {"config": vars(args), "runs": runs, "max_relative_deviation": deviation,
                                     "measurement_errors": errors, "reports": reports, "finished": True,
                                     "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
