"""The speed benchmark on a CUDA device: dense, static-pruned and routed, bf16, CUDA events, router on the GPU.

Side by side in one run (one process; GPU memory is reported as peak allocated per variant):
pre-fill (time to first token) for 128/256/512-token prompts, 128 generated tokens, and the router's time.
Prints the same ratios as `pudding bench` and writes JSON marked with the device name. Bounded: with
the defaults it finishes in well under 5 minutes on any recent GPU.

    python benchmarks/gpu_bench.py --out results/smollm2/bench-gpu.json
    python benchmarks/gpu_bench.py --device cpu --dtype float32 --repeats 1   # dry run of the same code path
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from pudding.core.omit import omit_blocks
from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.bench import _prompt_ids
from pudding.routing.model import PuddingModel


class Timer:
    """CUDA events on a GPU (with synchronisation), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return begin.elapsed_time(end) / 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="PuDDing artifact")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--lengths", default="128,256,512")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    pudding = PuddingModel.from_pretrained(args.model)
    model = pudding.model.to(device=device, dtype=getattr(torch, args.dtype))
    pudding.router.to(device)
    timer = Timer(device)
    lengths = [int(n) for n in args.lengths.split(",")]
    prompts = {n: _prompt_ids(pudding.tokenizer, n).to(device) for n in sorted(set(lengths) | {128})}
    texts = {n: pudding.tokenizer.decode(ids[0]) for n, ids in prompts.items()}
    [route] = pudding.route([texts[128]])

    def generate(ids, new_tokens, blocks):
        with omit_blocks(model, blocks), torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pudding.tokenizer.pad_token_id)

    results = {}
    for variant in ("dense", "static", "routed"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def run(n, new_tokens, variant=variant):
            if variant == "routed":
                blocks = pudding.route([texts[n]])[0].blocks
            else:
                blocks = () if variant == "dense" else route.blocks
            generate(prompts[n], new_tokens, blocks)

        run(128, 2)  # warm-up
        prefill = {n: statistics.median(timer(lambda n=n: run(n, 1)) for _ in range(args.repeats)) for n in lengths}
        decode = statistics.median(timer(lambda: run(128, args.new_tokens)) for _ in range(max(1, args.repeats // 3)))
        router = statistics.median(timer(lambda: pudding.route([texts[128]])) for _ in range(args.repeats))
        results[variant] = {"prefill_s": prefill, "decode_s": decode,
                            "router_s": router if variant == "routed" else 0.0,
                            "peak_allocated_bytes": (torch.cuda.max_memory_allocated() if device.type == "cuda"
                                                     else None)}
        print(f"{variant:<7} pre-fill " + " ".join(f"{n}:{1000 * s:.2f}ms" for n, s in prefill.items())
              + f"  {args.new_tokens} tokens {decode:.3f}s")
    ratios = {
        "routed_over_static_prefill": {n: results["routed"]["prefill_s"][n] / results["static"]["prefill_s"][n]
                                       for n in lengths},
        "dense_over_routed_prefill": {n: results["dense"]["prefill_s"][n] / results["routed"]["prefill_s"][n]
                                      for n in lengths},
        "dense_over_routed_decode": results["dense"]["decode_s"] / results["routed"]["decode_s"],
    }
    print(f"router {1000 * results['routed']['router_s']:.2f} ms; ratios {ratios}")
    if args.out:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        atomic_write_json(Path(args.out), {"device": name, "dtype": args.dtype, "set": list(route.blocks),
                                           "variants": results, "ratios": ratios, "config": vars(args),
                                           "provenance": provenance()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
