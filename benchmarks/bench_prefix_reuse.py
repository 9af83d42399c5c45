"""Greedy search with and without prefix reuse, side by side on the same model, data and steps.

    .venv/bin/python benchmarks/bench_prefix_reuse.py --model default --task arc_easy --objective tl --k 2 --samples 32

Both runs must choose the same blocks (the reuse is exact); the script prints the wall-time ratio and the
block-execution ratio, and writes them with provenance to results/bench_prefix_reuse.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from pudding.core.load import load_model
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.candidates import calibration_docs
from pudding.pruning.search import get_objective, greedy_search


def run(scorer, objective, docs, k, reuse):
    evaluator = CandidateEvaluator(scorer, objective.requests(docs), reuse_prefix=reuse)
    start = time.perf_counter()
    result = greedy_search(evaluator, lambda scores: objective.loss(docs, scores), k)
    return result, time.perf_counter() - start, evaluator.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--task", default="arc_easy")
    parser.add_argument("--objective", default="tl")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", default="results/bench_prefix_reuse.json")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    scorer = LikelihoodScorer(model, tokenizer, max_length=args.max_length)
    objective = get_objective(args.objective)
    docs = calibration_docs(objective.text_task or args.task, args.samples)
    scorer.score(objective.requests(docs)[:4])  # warm-up
    reused, reused_s, stats = run(scorer, objective, docs, args.k, reuse=True)
    plain, plain_s, _ = run(scorer, objective, docs, args.k, reuse=False)
    assert reused.removal_order == plain.removal_order, "prefix reuse changed the chosen blocks"

    report = {"removal_order": reused.removal_order, "seconds_without_reuse": round(plain_s, 2),
              "seconds_with_reuse": round(reused_s, 2), "wall_time_ratio": round(plain_s / reused_s, 3),
              "block_execution_ratio": round(stats.ratio, 3), "threads": torch.get_num_threads(),
              "config": vars(args), "provenance": provenance()}
    print(f"{args.task}/{args.objective}, k={args.k}, {args.samples} docs: removed {reused.removal_order} both ways")
    print(f"without reuse: {plain_s:8.1f} s")
    print(f"with reuse   : {reused_s:8.1f} s")
    print(f"speed-up     : {plain_s / reused_s:.2f}x wall time, {stats.ratio:.2f}x fewer block executions")
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
