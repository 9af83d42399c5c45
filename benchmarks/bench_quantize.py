"""Quantized against fp32, side by side in one run: fidelity of the scores, the search and accuracy, and speed.

    .venv/bin/python benchmarks/bench_quantize.py --model default --limit 100 --output results/smollm2/quantize.json

Each variant of ``--methods`` is a ``--quantize`` method, optionally with the ``--quantize-skip`` suffixes kept
fp32 after a colon: the default compares ``int8``, ``int8`` with every ``down_proj`` in fp32, ``int8-smooth``
(SmoothQuant) and both together:

    .venv/bin/python benchmarks/bench_quantize.py --limit 100 --output results/smollm2/quantize-variants.json

For each variant (fp32 is always the reference) on the same documents:

- fidelity: mean and maximum absolute difference of every choice's summed log-likelihood, the share of
  documents whose predicted answer (the task's own metric) agrees with fp32, and accuracy with its standard
  error per task;
- the greedy search: the first ``--search-k`` removals on ``--search-docs`` calibration documents, whether
  they pick the same blocks, and the rank correlation of the first step's candidate losses;
- speed: scorer tokens/s, timed interleaved (each round runs every variant in a rotated order, so drift on a
  shared machine hits them alike) and reported as the median of the per-round paired ratios with its range;
  the greedy-search step time (``--search-k 0`` leaves the search out); resident weight bytes.

- pre-fill and decode: one prompt of ``--prompt-tokens`` real tokens (batch 1), its pre-fill and a greedy
  ``--new-tokens`` decode with the KV cache, timed interleaved the same way; ``pudding bench --quantize``
  gives dense against pruned at one precision.

Writes one JSON with provenance.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from pudding.core.load import load_model
from pudding.core.metrics import METRICS, aggregate, scores_by_doc
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.quantize import quantize_model, skip_names, weight_bytes
from pudding.core.score import LikelihoodScorer, doc_requests, encode_request
from pudding.core.tasks import PAPER_TASKS, get_task, load_docs
from pudding.evaluation.bench import prompt_ids
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.candidates import calibration_docs
from pudding.pruning.search import get_objective, greedy_search


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result
    return float(torch.corrcoef(torch.tensor([ranks(a), ranks(b)]))[0, 1])


DEFAULT_VARIANTS = "int8,int8:down_proj,int8-smooth,int8-smooth:down_proj"


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """``"int8-smooth:down_proj;o_proj"`` -> ``("int8-smooth", ("down_proj", "o_proj"))``."""
    method, _, skip = text.partition(":")
    return method.strip(), skip_names(skip.replace(";", ","))


def summary(per_task: dict) -> dict:
    """Over all tasks: the mean of the per-task mean |dLL|, the largest |dLL|, agreement over every document."""
    documents = sum(r["documents"] for r in per_task.values())
    return {"mean_abs_ll_diff": statistics.fmean(r["mean_abs_ll_diff"] for r in per_task.values()),
            "max_abs_ll_diff": max(r["max_abs_ll_diff"] for r in per_task.values()),
            "answer_agreement": sum(r["answer_agreement"] * r["documents"] for r in per_task.values()) / documents,
            "documents": documents}


def fidelity(reference: dict, candidate: dict) -> dict:
    """Score differences, answer agreement and accuracy of ``candidate`` against ``reference`` per task."""
    report = {}
    for task, (docs, ref_scores) in reference.items():
        metric = get_task(task).metric
        cand_scores = candidate[task][1]
        diffs = [abs(a.logprob - b.logprob) for a, b in zip(ref_scores, cand_scores)]
        ref_docs, cand_docs = scores_by_doc(docs, ref_scores), scores_by_doc(docs, cand_scores)
        agree = [_answer(r, metric) == _answer(c, metric) for r, c in zip(ref_docs, cand_docs)]
        report[task] = {"metric": metric, "mean_abs_ll_diff": statistics.fmean(diffs), "max_abs_ll_diff": max(diffs),
                        "answer_agreement": sum(agree) / len(agree), "documents": len(agree),
                        "accuracy": vars(aggregate(cand_docs, metric))}
    return report


def _answer(doc, metric: str) -> int:
    # The chosen answer is the one the metric credits: try each choice as the gold and see which scores 1.
    return next(i for i in range(len(doc.choices)) if METRICS[metric](type(doc)(doc.doc_id, i, doc.choices,
                                                                              doc.choice_chars)) == 1.0)


def search_comparison(models: dict, tokenizer, task: str, docs: int, k: int, batch_tokens: int) -> dict:
    objective = get_objective("tl")
    calibration = calibration_docs(task, docs)
    requests = objective.requests(calibration)
    results = {}
    for name, model in models.items():
        evaluator = CandidateEvaluator(LikelihoodScorer(model, tokenizer, max_batch_tokens=batch_tokens), requests)
        results[name] = greedy_search(evaluator, lambda s: objective.loss(calibration, s), k)
    reference = results["fp32"]
    first = sorted(reference.steps[0].candidate_losses)
    return {name: {"removal_order": r.removal_order, "same_blocks": r.removal_order == reference.removal_order,
                   "step_seconds": [round(s.seconds, 2) for s in r.steps],
                   "first_step_rank_correlation": _spearman([reference.steps[0].candidate_losses[b] for b in first],
                                                            [r.steps[0].candidate_losses[b] for b in first])}
            for name, r in results.items()}


def _rotated(names: list[str], round_index: int) -> list[str]:
    """The order of one round: each round starts one model later, so drift hits every model alike."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


def _speedup(reference: list[float], seconds: list[float]) -> dict:
    """fp32 time over this model's time, paired within each round: the median and range over the rounds."""
    ratios = [f / q for f, q in zip(reference, seconds)]
    return {"speedup_vs_fp32_median": round(statistics.median(ratios), 3),
            "speedup_vs_fp32_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def interleaved_speed(scorers: dict, requests: list, tokens: int, rounds: int) -> dict:
    names = list(scorers)
    seconds = {n: [] for n in names}
    for name in names:
        scorers[name].score(requests[:8])  # warm-up
    for round_index in range(rounds):
        for name in _rotated(names, round_index):
            start = time.perf_counter()
            scorers[name].score(requests)
            seconds[name].append(time.perf_counter() - start)
    return {name: {"tokens_per_s": round(tokens / statistics.median(seconds[name]), 1),
                   "seconds": [round(s, 3) for s in seconds[name]], **_speedup(seconds["fp32"], seconds[name])}
            for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default=DEFAULT_VARIANTS,
                        help="comma-separated variants: a --quantize method, then optionally ':' and the layer "
                             "suffixes kept fp32, ';'-separated (int8-smooth:down_proj)")
    parser.add_argument("--head", action="store_true", help="quantize the LM head too")
    parser.add_argument("--tasks", default=",".join(PAPER_TASKS))
    parser.add_argument("--limit", type=int, default=100, help="evaluation documents per task")
    parser.add_argument("--speed-docs", type=int, default=16, help="calibration documents per task timed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-rounds", type=int, default=5, help="0: no pre-fill and decode timing")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="pre-fill length (batch 1)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated in the decode timing")
    parser.add_argument("--search-task", default="arc_easy")
    parser.add_argument("--search-docs", type=int, default=16)
    parser.add_argument("--search-k", type=int, default=2, help="0: no search comparison")
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--output", default="results/smollm2/quantize.json")
    args = parser.parse_args()

    fp32, tokenizer = load_model(args.model)
    models = {"fp32": fp32}
    quantize_seconds = {}
    for variant in args.methods.split(","):
        method, skip = parse_variant(variant)
        start = time.perf_counter()
        models[variant] = quantize_model(copy.deepcopy(fp32), method, head=args.head, skip=skip, tokenizer=tokenizer)
        quantize_seconds[variant] = round(time.perf_counter() - start, 2)  # SmoothQuant's calibration included
    scorers = {n: LikelihoodScorer(m, tokenizer, max_batch_tokens=args.batch_tokens) for n, m in models.items()}
    tasks = args.tasks.split(",")

    scored = {}
    for name, scorer in scorers.items():
        scored[name] = {}
        for task in tasks:
            docs = load_docs(task, "evaluation", limit=args.limit)
            requests = [r for d in docs for r in doc_requests(d)]
            scored[name][task] = (docs, scorer.score(requests, progress=f"{name} {task}"))
    report = {"fidelity": {n: fidelity(scored["fp32"], scored[n]) for n in models if n != "fp32"},
              "quantize_seconds": quantize_seconds,
              "accuracy_fp32": {t: vars(aggregate(scores_by_doc(*scored["fp32"][t]), get_task(t).metric))
                                for t in tasks},
              "weight_bytes": {n: weight_bytes(m) for n, m in models.items()}}

    speed_requests = [r for t in tasks for d in load_docs(t, "calibration", limit=args.speed_docs)
                      for r in doc_requests(d)]
    tokens = sum(len(e.context) + len(e.continuation)
                 for e in (encode_request(tokenizer, r, scorers["fp32"].add_bos) for r in speed_requests))
    report["speed"] = interleaved_speed(scorers, speed_requests, tokens, args.rounds)
    if args.latency_rounds > 0:
        report["latency"] = interleaved_latency(models, tokenizer, args.prompt_tokens, args.new_tokens,
                                                args.latency_rounds)
    report["summary"] = {n: summary(per_task) for n, per_task in report["fidelity"].items()}
    if args.search_k > 0:
        report["search"] = search_comparison(models, tokenizer, args.search_task, args.search_docs, args.search_k,
                                             args.batch_tokens)
    report.update(config=vars(args), threads=torch.get_num_threads(), provenance=provenance())
    atomic_write_json(args.output, report)
    _print(report, tasks)


def interleaved_latency(models: dict, tokenizer, length: int, new_tokens: int, rounds: int) -> dict:
    """Batch-1 pre-fill of ``length`` tokens and greedy decode of ``new_tokens`` with the KV cache, every model
    timed in turn each round (rotated), each ratio to fp32 paired within its round: ``pudding bench``'s
    figures, fp32 against each variant in one process."""
    ids = prompt_ids(tokenizer, length)
    mask = torch.ones_like(ids)
    names = list(models)

    def generate(model, n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    for model in models.values():
        generate(model, 2)  # warm-up
    seconds = {n: {"prefill": [], "decode": []} for n in names}
    for round_index in range(rounds):
        for name in _rotated(names, round_index):
            seconds[name]["prefill"].append(generate(models[name], 1))
            seconds[name]["decode"].append(generate(models[name], new_tokens))
    report = {"prompt_tokens": length, "new_tokens": new_tokens}
    for name in names:
        report[name] = {kind: {"median_s": round(statistics.median(seconds[name][kind]), 4),
                               **_speedup(seconds["fp32"][kind], seconds[name][kind])}
                        for kind in ("prefill", "decode")}
    return report


def _print(report: dict, tasks: list[str]) -> None:
    for name, per_task in report["fidelity"].items():
        print(f"\n{name} against fp32 (weights {report['weight_bytes'][name] / 2**20:.0f} MiB, "
              f"fp32 {report['weight_bytes']['fp32'] / 2**20:.0f} MiB)")
        print(f"{'task':14s} {'mean|dLL|':>9s} {'max|dLL|':>9s} {'agree':>6s} {'acc fp32':>9s} {'acc q':>9s}")
        for task in tasks:
            row, ref = per_task[task], report["accuracy_fp32"][task]
            ours = row["accuracy"]
            print(f"{task:14s} {row['mean_abs_ll_diff']:9.3f} {row['max_abs_ll_diff']:9.3f} "
                  f"{row['answer_agreement']:6.3f} {ref['value']:.3f}±{ref['stderr']:.3f} "
                  f"{ours['value']:.3f}±{ours['stderr']:.3f}")
    print("\nscorer speed (interleaved rounds; paired ratio median [range])")
    for name, row in report["speed"].items():
        print(f"{name:12s} {row['tokens_per_s']:8.1f} tok/s  x{row['speedup_vs_fp32_median']} "
              f"{row['speedup_vs_fp32_range']}")
    print("\nside by side: mean over tasks of mean|dLL|, max|dLL|, agreement over all documents, speed, weights")
    for name, row in report["summary"].items():
        print(f"{name:24s} {row['mean_abs_ll_diff']:7.3f} {row['max_abs_ll_diff']:7.3f} "
              f"{row['answer_agreement']:6.3f} "
              f"(N={row['documents']})  x{report['speed'][name]['speedup_vs_fp32_median']:<6} "
              f"{report['weight_bytes'][name] / 2**20:6.0f} MiB")
    if "latency" in report:
        latency = report["latency"]
        print(f"\npre-fill of {latency['prompt_tokens']} tokens and decode of {latency['new_tokens']} (batch 1, "
              "interleaved; x = fp32 time / variant time, median [range])")
        for name in report["speed"]:
            cells = [f"{kind} {row['median_s']:.3f} s x{row['speedup_vs_fp32_median']} {row['speedup_vs_fp32_range']}"
                     for kind, row in latency[name].items()]
            print(f"{name:24s} " + "  ".join(cells))
    if "search" not in report:
        return
    print("\ngreedy search")
    for name, row in report["search"].items():
        print(f"{name:12s} removes {row['removal_order']} same={row['same_blocks']} "
              f"rank corr {row['first_step_rank_correlation']:.3f} step s {row['step_seconds']}")


if __name__ == "__main__":
    main()
