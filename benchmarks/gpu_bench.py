"""The speed benchmark on a CUDA device: dense, static-pruned and routed, in bf16 and quantized, timed interleaved.

Side by side in one process, in rounds that rotate the order (round r runs A B C ..., round r+1 B C ... A), so
that drift hits every variant alike, as in ``pudding bench``:

- pre-fill (time to the first token) for 128/256/512-token prompts and ``--new-tokens`` generated tokens
  (forced length) after a 128-token prompt, each with the KV cache, through ``model.generate``;
- the variants: ``dense``; ``static``, the set the router picks for the 128-token prompt, fixed; ``routed``,
  which routes every prompt and then runs without its set, router time included;
- each precision in ``--quantize``: ``none`` (``--dtype``) and torchao's ``int8-weight-only`` and
  ``float8`` (dynamic per-row float8 activations and weights, Hopper and newer) on the block linears, the
  embeddings and LM head kept in ``--dtype`` as on the CPU path (:mod:`pudding.core.quantize`);
- every ratio is taken within a round and reported as median, quartiles and range over the rounds; a ratio
  beyond what the skipped compute allows is flagged as a measurement error
  (:func:`pudding.evaluation.bench.measurement_errors`);
- for each precision, whether omitting the set gives the same logits and cached greedy tokens as the same
  model with those blocks pruned for good (``prune_blocks``);
- the router alone, for each encoder in ``--router-shapes`` (the default MiniLM and the paper's BERT-base).

Two sources of weights:

- ``--model ARTIFACT`` (default ``default``): a PuDDing artifact with its trained router and real weights;
- ``--shape NAME``: the architecture in ``benchmarks/shapes/NAME.json`` (or a path) with random weights, and a
  router of the same architecture as the default one with random weights, choosing among ``n_sets`` seeded
  random sets of ``k`` blocks (never the first or last). Timing does not depend on weight values: every
  block has the same shape, the generated length is forced, and nothing branches on the data. This is how
  the paper's Llama-3.1-8B is timed on a machine that cannot download it (the same idea as vLLM's dummy
  weights); it says nothing about accuracy.

    python benchmarks/gpu_bench.py --out results/gpu/bench-default.json
    python benchmarks/gpu_bench.py --shape llama-3.1-8b --prompts prompts.json --out results/gpu/llama-8b.json
    python benchmarks/gpu_bench.py --save-prompts prompts.json      # real text, for machines without the data
    python benchmarks/gpu_bench.py --device cpu --dtype float32 --rounds 1   # dry run of the same code path
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError, PuddingError
from pudding.core.omit import get_blocks, num_blocks, omit_blocks, prune_blocks
from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.bench import _paired, _summary, compute_limit, measurement_errors

SHAPES = Path(__file__).parent / "shapes"
VARIANTS = ("dense", "static", "routed", "pruned")
TORCHAO_METHODS = ("int8-weight-only", "float8")
ROUTE_LENGTH = 128  # the static set is the one the router picks for the 128-token prompt
CHECK_TOKENS = 16  # greedy tokens compared in the omission check


# --- what is timed -----------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """The LLM under test, its prompts, and how a prompt is routed to an omission set."""

    model: nn.Module
    prompts: dict[int, torch.Tensor]  # length -> (1, length) token ids on the device
    texts: dict[int, str]  # length -> the same prompt as text, for the router
    route: Callable[[str], tuple[int, ...]]
    weights: str  # "trained" or "random"
    description: str
    pad_token_id: int
    model_bytes: int  # device memory the LLM alone took when it was placed there (0 off CUDA)


def read_shape(name: str) -> dict[str, Any]:
    """A shape file (``benchmarks/shapes/NAME.json`` or a path): ``config`` and, for an LLM, ``k`` and ``n_sets``."""
    path = Path(name) if name.endswith(".json") else SHAPES / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in SHAPES.glob("*.json"))
        raise ConfigError(f"unknown shape {name!r}: not a file, and not one of {known}")
    return json.loads(path.read_text())


def random_sets(total: int, k: int, n_sets: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``n_sets`` distinct sorted sets of ``k`` blocks, never the first or the last (as the search keeps them)."""
    if not 0 < k <= total - 2:
        raise ConfigError(f"k={k} must be between 1 and {total - 2} for a {total}-block model")
    rng = random.Random(seed)
    sets: list[tuple[int, ...]] = []
    while len(sets) < n_sets:
        candidate = tuple(sorted(rng.sample(range(1, total - 1), k)))
        if candidate not in sets:
            sets.append(candidate)
    return sets


def random_router(router_shape: str, tokenizer_dir: str | None, n_sets: int, device: torch.device):
    """A router with the default architecture (an encoder and a linear head) and random weights."""
    from pudding.routing.router import RouterConfig, build_router, resolve_encoder

    source = Path(tokenizer_dir or resolve_encoder("default"))
    with tempfile.TemporaryDirectory(prefix="pudding-router-shape-") as tmp:  # read once, while building
        folder = Path(tmp)
        for file in source.iterdir():
            if file.is_file() and ("token" in file.name or file.name in ("vocab.txt", "special_tokens_map.json")):
                (folder / file.name).write_bytes(file.read_bytes())
        (folder / "config.json").write_text(json.dumps(read_shape(router_shape)["config"]))
        router = build_router(RouterConfig(kind="encoder", n_sets=n_sets, backbone=str(folder)), for_loading=True)
    return router.to(device).eval()


def load_prompts(path: str | None, tokenizer, lengths: list[int], device) -> tuple[dict, dict]:
    """Prompts of exactly each length: from a ``--save-prompts`` file, or cut from BoolQ passages."""
    if path is not None:
        saved = json.loads(Path(path).read_text())
        missing = [n for n in lengths if str(n) not in saved]
        if missing:
            raise ConfigError(f"{path} has no prompt of {missing} tokens; it has {sorted(saved)}")
        ids = {n: torch.tensor([saved[str(n)]["ids"]]) for n in lengths}
        texts = {n: saved[str(n)]["text"] for n in lengths}
    else:
        from pudding.evaluation.bench import prompt_ids

        ids = {n: prompt_ids(tokenizer, n) for n in lengths}
        texts = {n: tokenizer.decode(ids[n][0]) for n in lengths}
    return {n: t.to(device) for n, t in ids.items()}, texts


def load_artifact_subject(args, lengths, device, dtype) -> Subject:
    from pudding.routing.model import PuddingModel

    pudding = PuddingModel.from_pretrained(args.model)
    before = allocated_bytes(device)
    model = pudding.model.to(device=device, dtype=dtype).eval()
    model_bytes = allocated_bytes(device) - before  # measured before the router and prompts join it
    pudding.router.to(device)
    prompts, texts = load_prompts(args.prompts, pudding.tokenizer, lengths, device)
    return Subject(model, prompts, texts, lambda text: pudding.route([text])[0].blocks, "trained",
                   f"PuDDing artifact {args.model}", pudding.tokenizer.pad_token_id, model_bytes)


def load_shape_subject(args, lengths, device, dtype) -> Subject:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = read_shape(args.shape)
    config = AutoConfig.for_model(**shape["config"])
    torch.manual_seed(args.seed)
    before = allocated_bytes(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model_bytes = allocated_bytes(device) - before  # measured before the router and prompts join it
    sets = random_sets(config.num_hidden_layers, shape["k"], shape["n_sets"], args.seed)
    router = random_router(args.router_shapes[0], args.router_tokenizer, len(sets), device)
    if args.prompts is None:
        from pudding.core.load import load_tokenizer

        tokenizer = load_tokenizer("default")
    else:
        tokenizer = None
    prompts, texts = load_prompts(args.prompts, tokenizer, lengths, device)
    if int(max(t.max() for t in prompts.values())) >= config.vocab_size:
        raise ConfigError(f"the prompts' token ids exceed the shape's vocabulary of {config.vocab_size}")

    def route(text: str) -> tuple[int, ...]:
        return sets[int(router.choose(router.scores([text]))[0])]

    return Subject(model, prompts, texts, route, "random", shape["description"], config.pad_token_id or 0,
                   model_bytes)


# --- precisions -------------------------------------------------------------------------------------------------


def torchao_config(method: str):
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig
    except ImportError as error:
        raise ConfigError(f"--quantize {method} needs torchao (pip install torchao): {error}") from None
    if method == "int8-weight-only":
        return Int8WeightOnlyConfig()
    from torchao.quantization import PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def quantized_copy(model: nn.Module, method: str) -> nn.Module:
    """A copy of ``model`` with its block linears quantized by torchao; embeddings and LM head untouched."""
    from torchao.quantization import quantize_

    config = torchao_config(method)
    quantized = copy.deepcopy(model)
    block_linears = {id(m) for block in get_blocks(quantized) for m in block.modules() if isinstance(m, nn.Linear)}
    try:
        quantize_(quantized, config, filter_fn=lambda module, fqn: id(module) in block_linears)
    except (AssertionError, RuntimeError, NotImplementedError) as error:  # torchao's word for "not on this device"
        raise ConfigError(f"--quantize {method} cannot run on this device: {error}") from None
    return quantized


def allocated_bytes(device: torch.device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


# --- timing -----------------------------------------------------------------------------------------------------


def wall(fn, device: torch.device) -> float:
    """Seconds of ``fn``, the device synchronised before and after (so the router's CPU work counts too)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def generate(model, ids, new_tokens: int, blocks, pad_token_id: int) -> torch.Tensor:
    with omit_blocks(model, blocks), torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)


def run_variant(subject: Subject, models: dict[str, nn.Module], variant: str, static: tuple[int, ...], n: int,
                new_tokens: int, device, batch: int = 1) -> dict[str, float]:
    """One timed call: route (``routed`` only), then generate; seconds of the whole and of the model alone."""
    timing = {"router": 0.0}
    blocks = {"dense": (), "static": static, "pruned": ()}.get(variant)
    model = models["pruned" if variant == "pruned" else "model"]
    if variant == "routed":
        routed: list[tuple[int, ...]] = []
        timing["router"] = wall(lambda: routed.append(subject.route(subject.texts[n])), device)
        blocks = routed[0]
    ids = subject.prompts[n].expand(batch, -1)
    timing["model"] = wall(lambda: generate(model, ids, new_tokens, blocks, subject.pad_token_id), device)
    timing["total"] = timing["router"] + timing["model"]
    return timing


def time_interleaved(subject: Subject, models: dict[str, dict[str, nn.Module]], static: tuple[int, ...],
                     lengths: list[int], new_tokens: int, rounds: int, batch: int, device) -> dict[str, Any]:
    """Every (precision, variant) pair, in rounds whose order rotates; raw seconds per round.

    ``models[precision]`` holds the full ``model`` and, under ``pruned``, the same model with the static set
    pruned for good: omission and a model built smaller must cost the same, and a ratio between them that is
    not 1 is overhead or drift. ``batch`` > 1 adds a pre-fill of that many copies of the longest prompt,
    which turns the pre-fill from launch-bound into compute-bound on a large GPU.
    """
    names = [(p, v) for p in models for v in VARIANTS]
    longest = max(lengths)
    for precision, variant in names:  # warm-up at every shape that is timed: kernels chosen, memory cached
        for n in lengths:
            run_variant(subject, models[precision], variant, static, n, 1, device)
        run_variant(subject, models[precision], variant, static, longest, 1, device, batch)
        run_variant(subject, models[precision], variant, static, ROUTE_LENGTH, new_tokens, device)
    prefill = {f"{p}/{v}": {str(n): [] for n in lengths} for p, v in names}
    model_prefill = copy.deepcopy(prefill)
    batched: dict[str, list[float]] = {f"{p}/{v}": [] for p, v in names}
    decode: dict[str, list[float]] = {f"{p}/{v}": [] for p, v in names}
    for round_index in tqdm(range(rounds), desc="rounds"):
        shift = round_index % len(names)
        for precision, variant in names[shift:] + names[:shift]:
            key = f"{precision}/{variant}"
            for n in lengths:
                timing = run_variant(subject, models[precision], variant, static, n, 1, device)
                prefill[key][str(n)].append(timing["total"])
                model_prefill[key][str(n)].append(timing["model"])
            batched[key].append(run_variant(subject, models[precision], variant, static, longest, 1, device,
                                            batch)["total"])
            decode[key].append(run_variant(subject, models[precision], variant, static, ROUTE_LENGTH, new_tokens,
                                           device)["total"])
    return {"prefill_seconds": prefill, "prefill_model_seconds": model_prefill, "decode_seconds": decode,
            "batched_prefill_seconds": batched, "batch": batch, "batched_length": longest}


def precision_ratios(timings: dict[str, Any], precision: str, limit: float) -> dict[str, Any]:
    """The ``pudding bench`` ratios within one precision, each with its spread over the rounds."""
    prefill, model_only, decode, batched = (timings[k] for k in ("prefill_seconds", "prefill_model_seconds",
                                                                  "decode_seconds", "batched_prefill_seconds"))
    dense, static, routed, pruned = (f"{precision}/{v}" for v in VARIANTS)
    lengths = list(prefill[dense])
    speed = {
        "dense_over_routed_prefill": {n: _paired(prefill[dense][n], prefill[routed][n]) for n in lengths},
        "dense_over_static_prefill": {n: _paired(prefill[dense][n], prefill[static][n]) for n in lengths},
        "dense_over_pruned_prefill": {n: _paired(prefill[dense][n], prefill[pruned][n]) for n in lengths},
        "static_over_pruned_prefill": {n: _paired(prefill[static][n], prefill[pruned][n]) for n in lengths},
        "routed_over_static_prefill": {n: _paired(prefill[routed][n], prefill[static][n]) for n in lengths},
        "routed_model_only_over_static_prefill": {n: _paired(model_only[routed][n], model_only[static][n])
                                                  for n in lengths},
        "dense_over_routed_batched_prefill": _paired(batched[dense], batched[routed]),
        "dense_over_static_batched_prefill": _paired(batched[dense], batched[static]),
        "dense_over_routed_decode": _paired(decode[dense], decode[routed]),
        "dense_over_static_decode": _paired(decode[dense], decode[static]),
        "dense_over_pruned_decode": _paired(decode[dense], decode[pruned]),
    }
    errors = measurement_errors(speed, limit)
    for name in ("dense_over_routed_batched_prefill", "dense_over_static_batched_prefill",
                 "dense_over_static_decode", "dense_over_pruned_decode"):
        if speed[name]["median"] > limit:
            errors.append(f"{name} is {speed[name]['median']:.3f}, above the compute limit {limit:.3f}")
    return {**speed, "compute_limit": limit, "measurement_errors": errors}


def cross_precision_ratios(timings: dict[str, Any], base: str, precision: str) -> dict[str, Any]:
    """How much faster each quantized variant is than the same variant at ``base`` precision."""
    prefill, decode = timings["prefill_seconds"], timings["decode_seconds"]
    return {variant: {"prefill": {n: _paired(prefill[f"{base}/{variant}"][n], prefill[f"{precision}/{variant}"][n])
                                  for n in prefill[f"{base}/{variant}"]},
                      "decode": _paired(decode[f"{base}/{variant}"], decode[f"{precision}/{variant}"])}
            for variant in VARIANTS[:3]}


# --- checks and the router alone --------------------------------------------------------------------------------


def omission_check(model: nn.Module, blocks: tuple[int, ...], ids: torch.Tensor, pad_token_id: int) -> dict:
    """Omitting ``blocks`` against the same model with them pruned for good: logits and cached greedy tokens."""
    pruned = prune_blocks(model, blocks)
    with torch.inference_mode():
        with omit_blocks(model, blocks):
            omitted_logits = model(ids).logits.float()
        pruned_logits = pruned(ids).logits.float()
    same_tokens = torch.equal(generate(model, ids, CHECK_TOKENS, blocks, pad_token_id),
                              generate(pruned, ids, CHECK_TOKENS, (), pad_token_id))
    del pruned
    return {"max_abs_logit_difference": float((omitted_logits - pruned_logits).abs().max()),
            "greedy_tokens_equal": same_tokens, "tokens": CHECK_TOKENS}


def time_routers(args, text: str, n_sets: int, device, rounds: int) -> dict[str, Any]:
    """The router alone (tokenize, encode, head, choose) per encoder architecture, random weights."""
    results = {}
    for shape in args.router_shapes:
        router = random_router(shape, args.router_tokenizer, n_sets, device)
        for _ in range(3):
            router.choose(router.scores([text]))
        seconds = [wall(lambda router=router: router.choose(router.scores([text])), device) for _ in range(rounds)]
        results[shape] = {"seconds": _summary(seconds), "parameters": sum(p.numel() for p in router.parameters())}
        del router
    return results


# --- the command ------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="default", help="PuDDing artifact (trained router, real weights)")
    source.add_argument("--shape", default=None, help="an architecture in benchmarks/shapes (random weights)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="none", help=f"comma list of none,{','.join(TORCHAO_METHODS)}")
    parser.add_argument("--lengths", default="128,256,512")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-batch", type=int, default=8,
                        help="also time a pre-fill of this many copies of the longest prompt (compute-bound)")
    parser.add_argument("--router-shapes", default="minilm-l6,bert-base",
                        help="router encoders timed alone; the first also routes --shape runs")
    parser.add_argument("--router-tokenizer", default=None, help="folder with the router's tokenizer files")
    parser.add_argument("--prompts", default=None, help="a --save-prompts file (default: cut from BoolQ)")
    parser.add_argument("--save-prompts", default=None, help="write the prompts of --lengths to this file and exit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 1 or args.prefill_batch < 1:
        parser.error("--rounds, --new-tokens and --prefill-batch must be at least 1")
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    unknown = [q for q in args.quantize if q not in ("none",) + TORCHAO_METHODS]
    if unknown or not args.quantize or args.quantize[0] != "none":
        parser.error(f"--quantize is a comma list that starts with none, of none,{','.join(TORCHAO_METHODS)}; "
                     f"got {','.join(args.quantize) or 'nothing'}")
    args.router_shapes = [s.strip() for s in args.router_shapes.split(",") if s.strip()]
    try:
        args.lengths = sorted({int(n) for n in args.lengths.split(",")} | {ROUTE_LENGTH})
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    return args


def save_prompts(path: str, lengths: list[int]) -> None:
    from pudding.core.load import load_tokenizer
    from pudding.evaluation.bench import prompt_ids

    tokenizer = load_tokenizer("default")
    prompts = {str(n): {"ids": prompt_ids(tokenizer, n)[0].tolist()} for n in lengths}
    for entry in prompts.values():
        entry["text"] = tokenizer.decode(entry["ids"])
    atomic_write_json(Path(path), prompts)


def versions() -> dict[str, str]:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import torchao

        found["torchao"] = torchao.__version__
    except ImportError:
        pass
    return found


def measure(args) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device (use --device cpu for a dry run)")
    for method in args.quantize[1:]:
        torchao_config(method)  # refuse a missing torchao before loading anything
    subject = (load_shape_subject if args.shape else load_artifact_subject)(args, args.lengths, device, dtype)
    full = {"none": subject.model}
    model_bytes = {"none": subject.model_bytes}
    for method in args.quantize[1:]:
        before = allocated_bytes(device)
        full[method] = quantized_copy(subject.model, method)
        model_bytes[method] = allocated_bytes(device) - before
    static = subject.route(subject.texts[ROUTE_LENGTH])
    total = num_blocks(subject.model)
    limit = compute_limit(total, len(static))
    checks = {p: omission_check(m, static, subject.prompts[ROUTE_LENGTH], subject.pad_token_id)
              for p, m in full.items()}
    models = {p: {"model": m, "pruned": prune_blocks(m, static)} for p, m in full.items()}
    timings = time_interleaved(subject, models, static, args.lengths, args.new_tokens, args.rounds,
                               args.prefill_batch, device)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "weights": subject.weights, "subject": subject.description,
        "total_blocks": total, "static_set": list(static), "compute_limit": limit,
        "model_bytes": model_bytes if device.type == "cuda" else None,
        "omission_check": checks,
        "ratios": {p: precision_ratios(timings, p, limit) for p in models},
        "quantized_over_base": {p: cross_precision_ratios(timings, "none", p) for p in args.quantize[1:]},
        "router_alone": time_routers(args, subject.texts[ROUTE_LENGTH], 10, device, max(5, args.rounds)),
        "timings": timings, "rounds": args.rounds, "order": "rotated each round",
        "versions": versions(), "config": {k: v for k, v in vars(args).items()}, "provenance": provenance(),
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    def ratio(summary):
        return f"{summary['median']:.3f} [{summary['min']:.3f}-{summary['max']:.3f}]"

    print(f"{report['device']}, {report['dtype']}, {report['subject']} ({report['weights']} weights); "
          f"static set {report['static_set']} of {report['total_blocks']} blocks; compute limit "
          f"{report['compute_limit']:.3f}")
    for precision, r in report["ratios"].items():
        prefill = " ".join(f"{n}:{ratio(s)}" for n, s in r["dense_over_routed_prefill"].items())
        print(f"[{precision}] dense/routed pre-fill {prefill}; decode {ratio(r['dense_over_routed_decode'])}; "
              f"dense/static decode {ratio(r['dense_over_static_decode'])}")
        print(f"[{precision}] routed/static pre-fill (router cost) "
              + " ".join(f"{n}:{ratio(s)}" for n, s in r["routed_over_static_prefill"].items()))
        print(f"[{precision}] dense/pruned pre-fill "
              + " ".join(f"{n}:{ratio(s)}" for n, s in r["dense_over_pruned_prefill"].items())
              + "; static(omitted)/pruned pre-fill "
              + " ".join(f"{n}:{ratio(s)}" for n, s in r["static_over_pruned_prefill"].items())
              + f"; dense/pruned decode {ratio(r['dense_over_pruned_decode'])}")
        print(f"[{precision}] batch {report['timings']['batch']} x {report['timings']['batched_length']} tokens "
              f"pre-fill: dense/static {ratio(r['dense_over_static_batched_prefill'])}, dense/routed "
              f"{ratio(r['dense_over_routed_batched_prefill'])}")
        for error in r["measurement_errors"]:
            print(f"[{precision}] MEASUREMENT ERROR: {error}")
        check = report["omission_check"][precision]
        print(f"[{precision}] omission vs pruned: max |logit diff| {check['max_abs_logit_difference']:.3g}, "
              f"greedy tokens equal: {check['greedy_tokens_equal']}")
    for precision, by_variant in report["quantized_over_base"].items():
        longest = max(next(iter(by_variant.values()))["prefill"], key=int)
        print(f"[{precision} vs none, speed-up] " + "; ".join(
            f"{v}: pre-fill {longest} {ratio(r['prefill'][longest])}, decode {ratio(r['decode'])}"
            for v, r in by_variant.items()))
    for shape, r in report["router_alone"].items():
        print(f"router {shape} ({r['parameters'] / 1e6:.1f}M parameters): {1000 * r['seconds']['median']:.2f} ms "
              f"median [{1000 * r['seconds']['min']:.2f}-{1000 * r['seconds']['max']:.2f}]")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.save_prompts:
            save_prompts(args.save_prompts, args.lengths)
            return 0
        report = measure(args)
    except PuddingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_report(report)
    if args.out:
        atomic_write_json(Path(args.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
