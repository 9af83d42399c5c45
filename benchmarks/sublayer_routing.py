"""Does a router choose better among sub-layer sets than among whole-block sets at the same budget? (issue 19)

Two candidate pools are searched on the same calibration documents with the same TL objective and budget k:
the paper's whole-block greedy search per task (``pudding candidates``) and the sub-layer search
(``pudding candidates --granularity sublayer``), which removes attention or MLP sub-layers up to k blocks'
worth of parameters. For each pool the paper's router (frozen MiniLM + MLP head, MSE on TL labels) is trained on
the same calibration prompts, over several seeds, and both are scored on the same evaluation documents. So are a
router over the union of the two pools, the static references (dense, SLEB, Shortened-LLaMA PPL and Taylor+,
ShortGPT and FinerCut at the same k), each pool's best static TL set, and the best single set at the budget by
calibration accuracy (any baseline's or either pool's), each chosen on calibration prompts.

Every set is scored once on every document (one scoring pool, ``pudding label`` on each split, checkpointed in
shards under ``--run-dir``: a rerun resumes). Nothing is chosen on evaluation documents; the per-task pool ceiling
is printed as the optimistic bound it is.

    .venv/bin/python benchmarks/sublayer_routing.py --block-pool results/smollm2/small/k3/pool \\
        --sublayer-pool results/smollm2/sublayer-routing/pool-sublayer-k3 \\
        --baselines results/smollm2/small/k3/baselines --finercut results/smollm2/compress/finercut-k3 \\
        --eval-samples 400 --run-dir results/smollm2/sublayer-routing-run --out results/smollm2/sublayer-routing
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pudding.core.load import load_model
from pudding.core.omit import parse_omission
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance
from pudding.core.tasks import PAPER_TASKS
from pudding.evaluation.tables import Routed, RowId, best_by, correct_at, macro_mean, paired_differences, table
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource, deduplicate
from pudding.pruning.finercut import block_equivalents, load_subblock_sets
from pudding.routing.labels import LabelConfig, Labels, build_labels
from pudding.routing.model import PuddingModel
from pudding.routing.train import TrainConfig, frozen_features, routing_data, split_rows, train_router


def tl_sets(pool: CandidatePool) -> list[PoolEntry]:
    """The pool's sets that a TL search found, each with its TL sources only (a set a margin search also found
    stays in, named after its TL task)."""
    out = []
    for entry in pool.sets:
        sources = tuple(s for s in entry.sources if s.objective == "tl")
        if sources:
            out.append(replace(entry, sources=sources))
    return out


BEST_STATIC = "best static set (chosen on calibration accuracy)"
# the static baselines' rows, by the method their pool records (pudding baselines)
BASELINE_ROWS = {"sleb": "SLEB", "shortened_ppl": "Shortened-LLaMA PPL", "taylor": "Shortened-LLaMA Taylor+",
                 "shortgpt": "ShortGPT"}


def scoring_pool(args, block: list[PoolEntry], sub: list[PoolEntry]) -> tuple[CandidatePool, dict[str, tuple]]:
    """Every set to score, once: dense, the static baselines, FinerCut, then both pools; and the fixed rows'
    sets."""
    base = CandidatePool.from_pretrained(args.block_pool)
    baselines = [e for e in CandidatePool.from_pretrained(args.baselines).sets if e.sources[0].method in BASELINE_ROWS]
    finercut = load_subblock_sets(args.finercut)[0]
    total = base.model["fingerprint"]["num_blocks"]
    finercut_key = parse_omission(finercut.omit, total).key
    fixed = {"dense": (), **{BASELINE_ROWS[e.sources[0].method]: e.blocks for e in baselines},
             f"FinerCut ({finercut.budget['sublayers']} sub-layers)": finercut_key}
    found = [((), SetSource("dense", None, None, [], [], [], 0.0)), *((e.blocks, e.sources[0]) for e in baselines),
             (finercut_key, SetSource("finercut", None, "js", finercut.removal_order, finercut.trajectory,
                                      finercut.sample_ids, finercut.seconds))]
    found += [(e.blocks, s) for e in [*block, *sub] for s in e.sources]
    return CandidatePool(deduplicate(found), base.model, {"k": args.k, "barriers": [1, 1]}, provenance()), fixed


def scores(args, pool_dir: Path, split: str, samples: int, model, tokenizer) -> Labels:
    """Every document of the split under every set (``pudding label``, resumable shards)."""
    out = Path(args.run_dir) / f"scores-{split}"
    config = LabelConfig(pool=str(pool_dir), out=str(out), tasks=PAPER_TASKS, samples=samples, split=split,
                         run_dir=str(Path(args.run_dir) / f"shards-{split}"), progress=not args.no_progress)
    build_labels(config, model=model, tokenizer=tokenizer)
    return Labels.load(out)


def routers(args, name: str, entries: list[PoolEntry], scoring: CandidatePool, labels_dir: Path, model,
            tokenizer) -> list[PuddingModel]:
    """The paper's router over ``entries``, one per seed; a seed already trained under ``--run-dir`` is loaded."""
    pool = CandidatePool(tuple(entries), scoring.model, {"k": args.k, "barriers": [1, 1]}, provenance())
    pool_dir = Path(args.run_dir) / "pools" / name
    pool.save_pretrained(pool_dir)
    out = []
    for seed in range(args.seeds):
        folder = Path(args.run_dir) / "routers" / f"{name}-seed{seed}"
        # a finished router has both files; results/ keeps no seed router's weights (.gitignore): retrain those
        if (folder / "training.json").exists() and (folder / "router.safetensors").exists():
            out.append(PuddingModel.from_pretrained(folder, model=model, tokenizer=tokenizer))
            continue
        out.append(train_router(TrainConfig(labels=str(labels_dir), pool=str(pool_dir), out=str(folder),
                                            router="embed-mlp", loss="mse", target="tl", seed=seed,
                                            backbone=args.backbone, epochs=args.epochs,
                                            progress=not args.no_progress), model=model, tokenizer=tokenizer))
    return out


def column_of(scoring: CandidatePool, blocks: tuple) -> int:
    return next(i for i, e in enumerate(scoring.sets) if e.blocks == blocks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-pool", required=True, help="the whole-block pool (pudding candidates) at --k")
    parser.add_argument("--sublayer-pool", required=True, help="the sub-layer pool (--granularity sublayer) at --k")
    parser.add_argument("--baselines", required=True, help="the static baselines at --k (SLEB's set is a row)")
    parser.add_argument("--finercut", required=True, help="FinerCut's subblock_sets.json (or its folder) at --k")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--calibration-samples", type=int, default=64, help="router prompts per task")
    parser.add_argument("--eval-samples", type=int, default=400, help="evaluation documents per task")
    parser.add_argument("--seeds", type=int, default=5, help="router seeds per pool")
    parser.add_argument("--backbone", default="default", help="the routers' frozen encoder (default: MiniLM)")
    parser.add_argument("--epochs", type=int, default=None, help="router epochs (default: train-router's)")
    parser.add_argument("--run-dir", required=True, help="scores, pools and routers; reruns resume")
    parser.add_argument("--out", required=True, help="folder for sublayer-routing.{json,md,png}")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    block = tl_sets(CandidatePool.from_pretrained(args.block_pool))
    sub = tl_sets(CandidatePool.from_pretrained(args.sublayer_pool))
    scoring, fixed = scoring_pool(args, block, sub)
    scoring_dir = Path(args.run_dir) / "scoring-pool"
    scoring.save_pretrained(scoring_dir)
    model, tokenizer = load_model(scoring.model["spec"])
    scoring.check_model(model.config)
    calibration_dir = Path(args.run_dir) / "scores-calibration"
    calibration = routing_data(scores(args, scoring_dir, "calibration", args.calibration_samples, model, tokenizer))
    evaluation = routing_data(scores(args, scoring_dir, "evaluation", args.eval_samples, model, tokenizer))
    train, _ = split_rows(calibration.texts, TrainConfig.val_fraction)
    by_task = {t: [i for i, task in enumerate(evaluation.tasks) if task == t] for t in PAPER_TASKS}

    pools = {"whole blocks": block, "sub-layers": sub, "both": list(deduplicate(
        [(e.blocks, s) for e in [*block, *sub] for s in e.sources]))}
    columns: dict[RowId, list[float]] = {RowId(n): evaluation.correct[:, column_of(scoring, b)].tolist()
                                         for n, b in fixed.items()}
    set_cost = {e.blocks: block_equivalents(model, list(e.blocks)) for e in scoring.sets}
    cost = {n: set_cost[b] for n, b in fixed.items()}
    # the best single set at the budget, by calibration accuracy: any baseline's or either pool's
    at_budget = [column_of(scoring, b) for n, b in fixed.items() if n in BASELINE_ROWS.values()]
    at_budget += [column_of(scoring, e.blocks) for e in [*block, *sub]]
    best_static = best_by(calibration.correct[train].mean(0), at_budget)
    columns[RowId(BEST_STATIC)] = evaluation.correct[:, best_static].tolist()
    cost[BEST_STATIC] = set_cost[scoring.sets[best_static].blocks]
    details = {"best static set": list(scoring.sets[best_static].blocks)}
    for name, entries in pools.items():
        pool_columns = [column_of(scoring, e.blocks) for e in entries]
        best_tl = best_by(calibration.labels[train].mean(0), pool_columns)
        static = RowId(f"best static TL set ({name})")
        columns[static] = evaluation.correct[:, best_tl].tolist()
        cost[static.label] = set_cost[scoring.sets[best_tl].blocks]
        trained = routers(args, name.replace(" ", "-"), entries, scoring, calibration_dir, model, tokenizer)
        features = frozen_features(trained[0].router, evaluation.texts)
        chosen = [Routed(p, p.router.scores(evaluation.texts, features=features), pool_columns).chosen()
                  for p in trained]
        per_seed = [correct_at(evaluation, c) for c in chosen]
        row = RowId(f"PuDDing over {name} (mean of {args.seeds} seeds)")
        columns[row] = [sum(v) / len(v) for v in zip(*per_seed)]
        cost[row.label] = sum(set_cost[scoring.sets[c].blocks] for picks in chosen for c in picks) / sum(
            len(picks) for picks in chosen)
        ceiling = {t: best_by(evaluation.correct[rows].mean(0), pool_columns) for t, rows in by_task.items()}
        columns[RowId(f"pool ceiling ({name}; optimistic)")] = correct_at(
            evaluation, [ceiling[t] for t in evaluation.tasks])
        details[name] = {
            "sets": [{"name": e.name, "blocks": list(e.blocks), "block_equivalents": round(set_cost[e.blocks], 4),
                      "calibration_tl": round(float(calibration.labels[:, column_of(scoring, e.blocks)].mean()), 4)}
                     for e in entries],
            "best_static_tl": list(scoring.sets[best_tl].blocks),
            "seed_averages": [round(float(v), 4) for v in macro_mean(torch.tensor(per_seed).T, by_task)],
            "choice_shares": {scoring.sets[c].name: round(sum(p.count(c) for p in chosen) / sum(map(len, chosen)), 4)
                              for c in sorted(set(sum(chosen, [])))},
        }
    result = table(evaluation, columns, PAPER_TASKS)
    row = {name: RowId(f"PuDDing over {name} (mean of {args.seeds} seeds)") for name in pools}
    statics = [RowId(n) for n in fixed if n in BASELINE_ROWS.values()] + [RowId(BEST_STATIC), RowId("dense")]
    comparisons = [(row["sub-layers"], row["whole blocks"]), (row["both"], row["whole blocks"])]
    comparisons += [(row[name], other) for name in ("whole blocks", "sub-layers") for other in statics]
    paired = {f"{a.label} minus {b.label}": paired_differences(columns, a, [b])[b] for a, b in comparisons}
    report = {"format": "pudding.sublayer-routing/1", "k": args.k, "n_eval": len(evaluation.texts),
              "n_calibration": len(calibration.texts), "table": result,
              "block_equivalents": {k: round(v, 4) for k, v in cost.items()}, "paired": paired, "pools": details,
              "config": vars(args), "provenance": provenance()}
    out = Path(args.out)
    atomic_write_json(out / "sublayer-routing.json", report)
    atomic_write_text(out / "sublayer-routing.md", markdown(report))
    plot(report, out / "sublayer-routing.png")
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    rows = report["table"]["rows"]
    tasks = list(report["table"]["metrics"])
    lines = [f"# Routing over sub-layer sets against whole-block sets, k={report['k']}",
             "", f"{report['n_eval']} evaluation documents; routers trained on {report['n_calibration']} calibration "
             "prompts. Block-equivalents: removed parameters in units of one block (mean over routed documents).", "",
             "| row | blocks removed | average | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for label, row in rows.items():
        removed = report["block_equivalents"].get(label)
        cells = " | ".join(f"{row['tasks'][t]['value']:.3f}" for t in tasks)
        lines.append(f"| {label} | {'' if removed is None else f'{removed:.2f}'} | {row['average']:.3f} | {cells} |")
    lines += ["", "Paired differences over all documents (95% interval):", ""]
    lines += [f"- {name}: {v['difference']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] (N={v['n']})"
              for name, v in report["paired"].items()]
    prov = report["provenance"]
    lines += ["", f"- command: `{' '.join(prov.get('command', []))}`",
              f"- git commit: {prov['git']['commit']}{' (dirty tree)' if prov['git'].get('dirty') else ''}",
              f"- date: {prov['date']}", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["table"]["rows"]
    labels = [label for label in rows if "ceiling" not in label]
    averages = [rows[label]["average"] for label in labels]
    removed = [report["block_equivalents"].get(label, float("nan")) for label in labels]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for x, y, label in zip(removed, averages, labels):
        ax.scatter(x, y, s=40, marker="*" if "PuDDing" in label else "o")
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("blocks' worth of parameters removed (mean over documents)")
    ax.set_ylabel(f"average accuracy ({report['n_eval']} documents)")
    ax.set_title(f"Sub-layer and whole-block candidate sets, budget k={report['k']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
