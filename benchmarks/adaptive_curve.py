"""Adaptive depth's measurement: accuracy against the mean number of blocks skipped (docs/ADAPTIVE.md).

Reads per-document scores that ``pudding label --split evaluation`` (or ``pudding reproduce``) already
computed, so the LLM does not run: the ladder artifact's router predicts every set's score for each
evaluation prompt, a sweep of tolerances gives the adaptive curve, and the static baselines (each at every
depth of the ladder), PuDDing at a fixed k (the same router restricted to the k-block sets) and dense give
the rest. Writes ``adaptive-curve.json`` (with provenance) and ``adaptive-curve.png`` in ``--out``.

    .venv/bin/python benchmarks/adaptive_curve.py --artifact runs/adaptive/router \
        --scores runs/adaptive/eval-scores --baselines runs/adaptive/baselines-k9 --out results/smollm2/adaptive

``--scores`` may be repeated: each set's column is taken from the first folder that scored it (the k=3 and
the k=6 scores of one reproduction, say), provided every folder holds the same documents.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pudding.core.errors import ConfigError, PuddingError
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance
from pudding.pool.artifact import DENSE_SOURCE, CandidatePool, PoolEntry, artifact_folder, ladder_pool
from pudding.routing.adaptive import adaptive_curve, check_adaptive, combine_labels, plot_curve
from pudding.routing.model import PuddingModel, read_config
from pudding.routing.train import routing_data, split_rows

STATIC_METHODS = ("sleb", "shortened_ppl", "shortgpt")  # the rows; taylor can be added with --methods


def static_sets(baselines: CandidatePool, depths: list[int], methods: tuple[str, ...]) -> dict[str, dict[int, tuple]]:
    """method -> {k: blocks}: each static baseline's set at every depth (exact, from its search or ranking)."""
    found: dict[str, dict[int, tuple]] = {}
    for entry in ladder_pool([baselines], depths).sets:
        for source in entry.sources:
            if source.method in methods:
                found.setdefault(source.method, {})[entry.k] = entry.blocks
    missing = [m for m in methods if m not in found]
    if missing:
        raise PuddingError(f"the baselines pool has no {missing}; it has {sorted(found)}")
    return found


def measure(artifact: str, scores: list[str], baselines: str, methods: tuple[str, ...], points: int,
            held_out: bool = False) -> dict:
    """The curve (see :func:`pudding.routing.adaptive.adaptive_curve`) for one ladder artifact on scored documents;
    with ``held_out``, only on the prompts its router held out from training (for calibration labels)."""
    pudding = PuddingModel.from_pretrained(artifact, router_only=True)
    depths = [e.k for e in pudding.pool.sets]
    check_adaptive(depths, pudding.router.config.loss)
    statics = static_sets(CandidatePool.from_pretrained(baselines), sorted({k for k in depths if k > 0}), methods)
    wanted = [e.blocks for e in pudding.pool.sets] + [b for by_k in statics.values() for b in by_k.values()]
    scored = {tuple(b) for folder in scores for b in _sets_of(folder)}
    if () in scored:
        wanted.append(())
    unique = list(dict.fromkeys(wanted))
    needed = CandidatePool(tuple(PoolEntry(b, (DENSE_SOURCE,)) for b in unique), pudding.pool.model)
    data = routing_data(combine_labels(scores, needed))
    if held_out:
        data = data.subset(held_out_rows(artifact, data.texts))
    column = {blocks: i for i, blocks in enumerate(unique)}
    curve = adaptive_curve(pudding.router.scores(data.texts), depths, data.correct,
                           [column[e.blocks] for e in pudding.pool.sets], data.tasks,
                           {m: {k: column[b] for k, b in by_k.items()} for m, by_k in statics.items()},
                           column.get(()), points)
    return {"curve": curve, "artifact": artifact, "scores": scores, "baselines": baselines,
            "router": {"kind": pudding.router.config.kind, "loss": pudding.router.config.loss,
                       "target": pudding.router.config.target},
            "ladder": {"pool": pudding.pool.fingerprint(), "sets": [e.name for e in pudding.pool.sets],
                       "depths": depths}, "tasks": sorted(set(data.tasks)), "held_out": held_out}


def held_out_rows(artifact: str, texts: list[str]) -> list[int]:
    """The rows of ``texts`` that the artifact's router held out from training: its validation questions (the
    split is by question text, so routers trained on the same labels with the same fraction share it)."""
    training = read_config(artifact_folder(artifact)).get("training", {}).get("config", {})
    if "val_fraction" not in training:
        raise ConfigError(f"{artifact} records no validation fraction, so its held-out prompts are unknown")
    rows = split_rows(texts, training["val_fraction"])[1]
    if not rows:
        raise ConfigError("none of these prompts was held out from the router's training: --held-out is for the "
                          "calibration labels it was trained on")
    return rows


def _sets_of(folder: str) -> list[list[int]]:
    from pudding.routing.labels import Labels

    return Labels.load(folder).meta["sets"]


def render(result: dict) -> str:
    """A few lines: each matched comparison, adaptive minus the row at the same mean k."""
    curve = result["curve"]
    which = " (calibration prompts held out from the router's training)" if result.get("held_out") else ""
    lines = [f"{curve['documents']} documents{which}; ladder depths {curve['depths']}; router target "
             f"{result['router']['target']} (tolerance units)"]
    if "dense" in curve:
        lines.append(f"dense: accuracy {curve['dense']['accuracy']:.3f}")
    for m in curve["matched"]:
        if m["tolerance"] is None:
            lines.append(f"{m['row']} at k={m['k']}: {m['reason']}")
            continue
        lines.append(f"{m['row']} at k={m['k']}: {m['row_accuracy']:.3f}; adaptive at tolerance {m['tolerance']:.4g} "
                     f"(mean k {m['adaptive_mean_k']:.2f}) {m['adaptive_accuracy']:.3f}; paired difference "
                     f"{m['difference']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}] (N={m['n']})")
    lines += _mixture_summary(curve["versus_mixture"])
    return "\n".join(lines)


def _mixture_summary(comparisons: list[dict]) -> list[str]:
    """Per row: at how many adaptive points (mean k > 0) adaptive is above or below the row mixed to the same
    mean k with 95% confidence, and the point where it does worst."""
    lines = ["adaptive against each row mixed to the same mean k (the straight lines between its points):"]
    by_row: dict[str, list[dict]] = {}
    for m in comparisons:
        if m["mean_k"] > 1e-9:  # at mean k 0 every row is dense, as is adaptive
            by_row.setdefault(m["row"], []).append(m)
    for row, points in by_row.items():
        above = sum(m["ci95"][0] > 0 for m in points)
        below = sum(m["ci95"][1] < 0 for m in points)
        worst = min(points, key=lambda m: m["difference"])
        mean = sum(m["difference"] for m in points) / len(points)
        lines.append(f"  {row}: above in {above} and below in {below} of {len(points)} points; mean difference "
                     f"{mean:+.3f}; worst {worst['difference']:+.3f} [{worst['ci95'][0]:+.3f}, "
                     f"{worst['ci95'][1]:+.3f}] at mean k {worst['mean_k']:.2f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", required=True, help="PuDDing artifact trained on a depth-ladder pool")
    parser.add_argument("--scores", action="append", required=True,
                        help="label folder of the evaluation documents (pudding label --split evaluation); repeat")
    parser.add_argument("--baselines", required=True, help="the static baselines' pool (pudding baselines --out)")
    parser.add_argument("--methods", default=",".join(STATIC_METHODS), help="static methods to draw")
    parser.add_argument("--points", type=int, default=41, help="tolerances on the adaptive curve")
    parser.add_argument("--out", required=True, help="folder for adaptive-curve.json and adaptive-curve.png")
    parser.add_argument("--held-out", action="store_true",
                        help="only the prompts the router held out from training: pass its calibration labels as "
                             "--scores to compare routers (a label target, say) without evaluation documents")
    args = parser.parse_args(argv)
    try:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        result = measure(args.artifact, args.scores, args.baselines, methods, args.points, args.held_out)
    except PuddingError as error:
        print(f"adaptive_curve: error: {error}", file=sys.stderr)
        return 2
    out = Path(args.out)
    atomic_write_json(out / "adaptive-curve.json", {**result, "provenance": provenance()})
    plot_curve(result["curve"], out / "adaptive-curve.png",
               f"Adaptive depth: {result['curve']['documents']} "
               f"{'held-out calibration prompts' if args.held_out else 'evaluation documents'}")
    summary = render(result)
    atomic_write_text(out / "adaptive-curve.md", summary + "\n")
    print(summary)
    print(f"wrote {out / 'adaptive-curve.json'}, {out / 'adaptive-curve.md'} and {out / 'adaptive-curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
