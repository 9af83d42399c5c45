"""Router overhead: time to route one prompt, for each router type, against the LLM's pre-fill of that prompt.

Every router and the LLM pre-fill are timed on the same prompts in one run (batch size 1, after a
warm-up; medians over the prompts). Prints per router: route ms, pre-fill ms, and their ratio.

    .venv/bin/python benchmarks/bench_router.py --routers default results/smollm2/k6/routers/* \
        --out results/smollm2/bench_router.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pudding.core.load import load_model
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.tasks import load_docs
from pudding.routing.model import PuddingModel

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", default=["default"], help="PuDDing artifact folders (or default)")
    parser.add_argument("--model", default="default", help="the base LLM (must match the artifacts)")
    parser.add_argument("--prompts", type=int, default=5, help="prompts per task")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    texts = [d.router_text for t in TASKS for d in load_docs(t, "evaluation", limit=args.prompts)]

    def prefill(text):
        ids = tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            model(**ids, use_cache=True)

    prefill(texts[0])
    prefill_s = statistics.median(timed(lambda t=t: prefill(t)) for t in texts)
    rows = {}
    for folder in args.routers:
        pudding = PuddingModel.from_pretrained(folder, model=model, tokenizer=tokenizer)
        pudding.route(texts[:1])
        route_s = statistics.median(timed(lambda t=t, pudding=pudding: pudding.route([t])) for t in texts)
        name = f"{pudding.router.kind}-{pudding.router.config.loss}" + (" (shipped)" if folder == "default" else "")
        rows[name] = {"folder": folder, "route_ms": 1000 * route_s, "prefill_ms": 1000 * prefill_s,
                      "route_over_prefill": route_s / prefill_s,
                      "router_parameters": sum(p.numel() for p in pudding.router.parameters())}
        print(f"{name:<28} route {1000 * route_s:7.2f} ms   dense pre-fill {1000 * prefill_s:7.2f} ms   "
              f"ratio {route_s / prefill_s:.3f}")
    if args.out:
        atomic_write_json(Path(args.out), {"prompts": len(texts), "threads": args.threads, "routers": rows,
                                           "config": vars(args), "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
