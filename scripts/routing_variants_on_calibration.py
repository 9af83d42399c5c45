"""Validation accuracy of the routing variants on existing calibration labels, without any evaluation data.

Trains one router per label target (tl, margin, choice-prob) with and without safe routing on a label
artifact, and prints each one's accuracy on its validation prompts (held out from training by question;
cross-fitted for safe routing), next to the best single set and the label oracle on the same prompts. This
is the selection signal ``pudding reproduce`` uses; no evaluation document is read.

    .venv/bin/python scripts/routing_variants_on_calibration.py --labels results/smollm2/labels \\
        --pool results/smollm2/pool --out results/smollm2/small/routing-variants-validation.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pudding.core.load import load_model
from pudding.core.provenance import atomic_write_json, provenance
from pudding.pool.artifact import CandidatePool
from pudding.routing.train import TARGETS, TrainConfig, train_router


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", required=True)
    parser.add_argument("--pool", required=True)
    parser.add_argument("--router", default="embed-mlp")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(CandidatePool.from_pretrained(args.pool).model["spec"])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in TARGETS:
            for safe in (False, True):
                name = f"{args.router}-mse-{target}" + ("-safe" if safe else "")
                trained = train_router(TrainConfig(labels=args.labels, pool=args.pool, out=str(Path(tmp) / name),
                                                   router=args.router, target=target, safe=safe, progress=False),
                                       model=model, tokenizer=tokenizer).training
                val = trained["val"]
                rows[name] = {"val_accuracy": trained["safe"]["acc_safe_crossfit"] if safe else val["acc_routed"],
                              "best_single_set": val["acc_static"], "label_oracle_set": val["acc_oracle_label"],
                              "n_val": val["n"], **({"safe": trained["safe"]} if safe else {})}
                print(f"{name:<32} validation accuracy {rows[name]['val_accuracy']:.3f} "
                      f"(best single set by label {val['acc_static']:.3f}, n={val['n']})"
                      + (f"; default set alone {trained['safe']['acc_default']:.3f}, switches on "
                         f"{trained['safe']['switch_rate']:.1%}" if safe else ""))
    if args.out:
        atomic_write_json(Path(args.out), {"labels": args.labels, "pool": args.pool, "variants": rows,
                                           "provenance": provenance()})


if __name__ == "__main__":
    main()
