"""Pre-fill and decode latency of omission sets that may name sub-layers, against dense, in one process.

    .venv/bin/python benchmarks/bench_subblock.py --model default --omit none --omit 20,21,22 \\
        --omit 15.attn,16.attn,17.attn,18.attn,19.attn,20.attn --length 256 --new-tokens 32 --repeats 5

``pudding bench`` times a PuDDing artifact's routed set against the same blocks pruned; it has no way to
take a set with sub-layers. This script times any ``--omit`` sets (the FinerCut sets of
``subblock_sets.json`` included) with :func:`pudding.core.omit.omit_blocks` on one loaded model. The sets are
interleaved within each repeat (after one warm-up each), so a change in machine load hits every set alike;
it reports the median and the interquartile range, and writes them with provenance to ``--output``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pudding.core.load import load_model
from pudding.core.omit import omission_key, omit_blocks
from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.bench import prompt_ids


def _timings(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Seconds to pre-fill ``ids`` (one forward), and to generate ``new_tokens`` after it with a KV cache."""
    with torch.inference_mode():
        start = time.perf_counter()
        model(ids, use_cache=False, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=0)
        return prefill, time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2], "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--omit", action="append", required=True, help="a set ('none' for dense); repeat")
    parser.add_argument("--length", type=int, default=256, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="results/bench_subblock.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    total = model.config.num_hidden_layers
    sets = [omission_key("" if o.strip().lower() in ("none", "dense") else o, total) for o in args.omit]
    ids = prompt_ids(tokenizer, args.length)
    times: dict[int, dict[str, list[float]]] = {i: {"prefill": [], "decode": []} for i in range(len(sets))}
    for repeat in range(args.repeats + 1):
        for i, omission in enumerate(sets):
            with omit_blocks(model, omission):
                prefill, decode = _timings(model, ids, args.new_tokens)
            if repeat:  # the first round is the warm-up
                times[i]["prefill"].append(prefill)
                times[i]["decode"].append(decode)
    rows = [{"omit": ",".join(map(str, s)) or "none", "prefill_s": _summary(times[i]["prefill"]),
             "decode_s": _summary(times[i]["decode"])} for i, s in enumerate(sets)]
    for row in rows:
        print(f"{row['omit']:<48} pre-fill {row['prefill_s']['median'] * 1e3:8.1f} ms   "
              f"decode {row['decode_s']['median'] * 1e3:8.1f} ms (median of {args.repeats})")
    atomic_write_json(args.output, {"rows": rows, "config": vars(args), "provenance": provenance()})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
