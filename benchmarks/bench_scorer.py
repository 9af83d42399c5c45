"""Batched scorer against the naive one-request-at-a-time HF loop, on the same requests, side by side.

    .venv/bin/python benchmarks/bench_scorer.py --model default --tasks arc_easy,piqa,hellaswag,boolq --docs 24

Prints tokens/s of each path, the speed-up, and the largest score difference (they must agree), then writes
the numbers with provenance to results/bench_scorer.json. The naive path is
:func:`pudding.core.score.score_one_by_one`: one forward per request, full-vocabulary logits at every position.
"""

from __future__ import annotations

import argparse
import time

import torch

from pudding.core.load import load_model
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer, doc_requests, encode_request, score_one_by_one
from pudding.core.tasks import load_docs


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag,boolq")
    parser.add_argument("--docs", type=int, default=24, help="documents per task (calibration split)")
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", default="results/bench_scorer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    requests = [r for task in args.tasks.split(",") for doc in load_docs(task, "calibration", limit=args.docs)
                for r in doc_requests(doc)]
    scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=args.batch_tokens)
    tokens = sum(len(e.context) + len(e.continuation) for e in (encode_request(tokenizer, r, scorer.add_bos)
                                                                for r in requests))
    scorer.score(requests[:8])  # warm-up: first-call allocations and kernel selection
    batched, batched_s = _timed(lambda: scorer.score(requests))
    naive, naive_s = _timed(lambda: score_one_by_one(model, tokenizer, requests))
    max_diff = max(abs(a.logprob - b.logprob) for a, b in zip(batched, naive))

    report = {
        "requests": len(requests), "tokens": tokens, "threads": args.threads,
        "naive_seconds": round(naive_s, 3), "batched_seconds": round(batched_s, 3),
        "naive_tokens_per_s": round(tokens / naive_s, 1), "batched_tokens_per_s": round(tokens / batched_s, 1),
        "speedup": round(naive_s / batched_s, 2), "max_abs_logprob_diff": max_diff,
        "config": vars(args), "provenance": provenance(),
    }
    print(f"{len(requests)} requests, {tokens} tokens, {args.threads} threads")
    print(f"naive loop   : {naive_s:8.2f} s  {tokens / naive_s:8.1f} tok/s")
    print(f"batched      : {batched_s:8.2f} s  {tokens / batched_s:8.1f} tok/s")
    print(f"speed-up     : {naive_s / batched_s:.2f}x   max |logprob diff| = {max_diff:.2e}")
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
