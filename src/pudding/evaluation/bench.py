"""``pudding bench``: latency and memory of the dense, the statically pruned and the routed (PuDDing) model.

Each variant runs in its own fresh Python process, so its peak resident memory is its own:

- ``dense``: the base model as loaded;
- ``static``: the base model with the routed set's blocks pruned in place (the same k, the same blocks as
  the routed run, so the two differ only by the router and the set switch);
- ``routed``: built from the block cache with only the kept blocks resident (:mod:`pudding.core.lazy`); each
  measurement includes routing the prompt and making its set resident.

Measured per variant, after a warm-up, ``repeats`` times (median and interquartile range):

- pre-fill: time to the first token for prompts of each length in ``lengths`` tokens;
- decode: the time to generate ``new_tokens`` tokens (forced length) after a 128-token prompt;
- for ``routed``: the router time and the set-switch time, also separately.

Torch threads are pinned to ``threads``; the machine's load average is recorded before and after.

With ``quantize`` (``int8``, :mod:`pudding.core.quantize`) every variant, in every process, runs the quantized model.
The block cache holds fp32 tensors, so the quantized ``routed`` variant keeps its whole quantized model
resident (it still routes, switches sets by omission and pays the router); its weight bytes are then counted
with :func:`pudding.core.quantize.weight_bytes`, which sees the int8 matrices that no parameter holds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError, PuddingError
from pudding.core.fields import SHIPPED_HELP, QuantizationFields
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance

VARIANTS = ("dense", "static", "routed")
USAGE_ERROR = 2  # a variant's exit status when it refuses its input (its stderr's last line is the message)
TEXT_TASK = "boolq"  # long Wikipedia passages: real text to cut prompts of exact token lengths from


@dataclass(frozen=True)
class BenchConfig(QuantizationFields):
    """Settings of ``pudding bench``; each field's help text is its documentation. Every variant runs the model
    quantized as ``quantize`` says."""

    model: str = field(default="default", metadata={"help": SHIPPED_HELP})
    lengths: tuple[int, ...] = field(default=(128, 256, 512), metadata={
        "help": "comma-separated prompt lengths in tokens for pre-fill"})
    new_tokens: int = field(default=128, metadata={"type": "int", "help": "tokens generated in the decode test"})
    repeats: int = field(default=5, metadata={"type": "int", "help": "measurements per figure, after one warm-up"})
    threads: int = field(default=2, metadata={"type": "positive_int", "help": "torch threads (pinned)"})
    cache_dir: str = field(default="runs/block-cache", metadata={"help": "block cache for the routed model"})
    out: str | None = field(default="results/bench", metadata={"help": "folder for bench.json and bench.md"})
    tolerance: float | None = field(default=None, metadata={
        "type": "float", "help": "adaptive depth (a depth-ladder artifact): route the prompts with this "
                                     "tolerance, so static and routed run the depth it reaches"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lengths, str):
            object.__setattr__(self, "lengths", parse_lengths(self.lengths))
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.new_tokens < 1 or self.threads < 1 or not self.lengths or min(self.lengths) < 1:
            raise ConfigError("new_tokens, threads and every length must be positive")
        if self.tolerance is not None:
            from pudding.routing.adaptive import check_tolerance

            object.__setattr__(self, "tolerance", check_tolerance(self.tolerance))


def parse_lengths(text: str) -> tuple[int, ...]:
    """``"128,256"`` as ``(128, 256)``; ConfigError naming ``--lengths`` for anything else."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--lengths must be comma-separated token counts like 128,256, got {text!r}") from None


def check_lengths(config: BenchConfig, limit: int | None) -> None:
    """ConfigError if a prompt length plus the new tokens exceeds the model's context of ``limit`` tokens."""
    too_long = [n for n in config.lengths if limit and n + config.new_tokens > limit]
    if too_long:
        raise ConfigError(f"prompt lengths {too_long} plus {config.new_tokens} new tokens exceed the context "
                          f"({limit})")


def _summary(values: list[float]) -> dict[str, float]:
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": quartiles[0], "q3": quartiles[2],
            "min": min(values), "max": max(values), "n": len(values)}


def prompt_ids(tokenizer, length: int):
    """Exactly ``length`` tokens of real text (BoolQ passages)."""
    import torch

    from pudding.core.tasks import load_docs

    ids: list[int] = []
    for doc in load_docs(TEXT_TASK, "evaluation", limit=200):
        ids.extend(tokenizer(doc.contexts[0] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise ConfigError(f"not enough text for a {length}-token prompt")
    return torch.tensor([ids[:length]])


# --- inside one variant's process ----------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class _Variant:
    """One variant loaded and ready to time: ``run(ids, new_tokens)`` returns its timings in seconds."""

    name: str
    pudding: Any
    model: Any
    store: Any
    blocks: tuple[int, ...]
    set_name: str
    texts: dict[int, str]
    prompts: dict[int, Any]
    load_seconds: float
    tolerance: float | None = None

    def run(self, ids, new_tokens: int) -> dict[str, float]:
        import torch

        from pudding.core.omit import omit_blocks

        total = self.model.config.num_hidden_layers
        timing = {"router": 0.0, "switch": 0.0}
        if self.name == "routed":
            timing["router"] = _timed(lambda: self.pudding.route([self.texts[ids.shape[1]]],
                                                                  tolerance=self.tolerance))
            if self.store is not None:
                timing["switch"] = self.store.ensure([i for i in range(total) if i not in self.blocks]).seconds
        mask = torch.ones_like(ids)
        with omit_blocks(self.model, self.blocks if self.name == "routed" else ()), torch.inference_mode():
            timing["generate"] = _timed(lambda: self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=self.pudding.tokenizer.pad_token_id))
        timing["total"] = timing["router"] + timing["switch"] + timing["generate"]
        return timing


def _load_variant(variant: str, config: BenchConfig) -> _Variant:
    from pudding.core.lazy import BlockStore, build_lazy_model, write_cache
    from pudding.core.load import context_length, load_tokenizer
    from pudding.core.omit import prune_blocks, require_whole_blocks
    from pudding.pool.artifact import artifact_folder
    from pudding.routing.model import PuddingModel, read_config

    folder = artifact_folder(config.model)
    spec = read_config(folder)["base_model"]["spec"]
    load_start = time.perf_counter()
    store = None
    quantized = config.quantize != "none"
    if variant == "routed" and not quantized:
        cache = Path(config.cache_dir)
        if not (cache / "blocks.safetensors").exists():
            raise ConfigError(f"no block cache at {cache}; the bench writes it in its dense run first")
        model = build_lazy_model(cache)
        store = BlockStore(model, cache)
        # adapters="none" in both variants: the bench times the pruned model itself (an unmerged LoRA adds its own
        # cost), and the lazy block store loads plain blocks, not PEFT-wrapped ones.
        pudding = PuddingModel.from_pretrained(folder, model=model, tokenizer=load_tokenizer(spec), adapters="none")
    else:
        pudding = PuddingModel.from_pretrained(folder, adapters="none", **config.quantization)
    model, tokenizer = pudding.model, pudding.tokenizer
    load_seconds = time.perf_counter() - load_start
    check_lengths(config, context_length(model))
    prompts = {n: prompt_ids(tokenizer, n) for n in sorted(set(config.lengths) | {128})}
    texts = {n: tokenizer.decode(ids[0]) for n, ids in prompts.items()}
    # Every variant routes the same 128-token prompt, so static prunes the very set routed runs.
    [route] = pudding.route([texts[128]], tolerance=config.tolerance)
    if variant == "dense" and not quantized:
        write_cache(model, config.cache_dir)  # for the routed run; idempotent (fp32 only: int8 layers hold no tensors)
    if variant == "static":
        require_whole_blocks(route.blocks, None, f"pudding bench's static variant (set {route.name})")
        prune_blocks(model, route.blocks, inplace=True)
    if store is not None:
        store.ensure([i for i in range(model.config.num_hidden_layers) if i not in route.blocks])
    return _Variant(variant, pudding, model, store, route.blocks, route.name, texts, prompts, load_seconds,
                    config.tolerance)


def _measure_variant(variant: str, config: BenchConfig) -> dict[str, Any]:
    """One variant alone in this process: its memory, load time, router and set-switch costs, and timings."""
    import torch

    from pudding.core.lazy import resident_bytes
    from pudding.core.quantize import weight_bytes

    torch.set_num_threads(config.threads)
    loaded = _load_variant(variant, config)
    model, store, blocks = loaded.model, loaded.store, loaded.blocks
    total = model.config.num_hidden_layers
    switches = []
    if store is not None and len(loaded.pudding.pool.sets) > 1:
        # The paper's Table 7 analog: alternate between the two pool sets that differ most.
        sets = loaded.pudding.pool.sets
        pairs = [(a.blocks, b.blocks) for a in sets for b in sets]
        first, second = max(pairs, key=lambda p: len(set(p[0]) ^ set(p[1])))
        for _ in range(config.repeats):
            for blocks_now in (first, second):
                switch = store.ensure([i for i in range(total) if i not in blocks_now])
                switches.append({"seconds": switch.seconds, "loaded": len(switch.loaded),
                                 "dropped": len(switch.dropped)})
        store.ensure([i for i in range(total) if i not in blocks])
    load_before = os.getloadavg()
    prompts, run = loaded.prompts, loaded.run
    run(prompts[128], 2)  # warm-up
    prefill = {n: [run(prompts[n], 1) for _ in range(config.repeats)] for n in config.lengths}
    decode = [run(prompts[128], config.new_tokens) for _ in range(config.repeats)]
    # Decode per token: total generation minus the 128-token pre-fill, over the new tokens after the first.
    prefill_128 = statistics.median(t["generate"] for t in prefill.get(128, [run(prompts[128], 1)]))
    return {
        "variant": variant, "omitted": list(blocks) if variant != "dense" else [], "set": loaded.set_name,
        "load_seconds": loaded.load_seconds,
        "prefill_seconds": {str(n): _summary([t["total"] for t in runs]) for n, runs in prefill.items()},
        # the model's own share, without routing and set switching: isolates what the router costs
        "prefill_model_seconds": {str(n): _summary([t["generate"] for t in runs]) for n, runs in prefill.items()},
        "decode_seconds": _summary([t["total"] for t in decode]),
        "decode_seconds_per_token": _summary([(t["generate"] - prefill_128) / (config.new_tokens - 1)
                                              for t in decode]) if config.new_tokens > 1 else None,
        "router_seconds": _summary([t["router"] for runs in prefill.values() for t in runs]),
        "switch_seconds": _summary([t["switch"] for runs in prefill.values() for t in runs]),
        "set_switch": {"seconds": _summary([w["seconds"] for w in switches[1:]]),
                       "blocks_loaded": switches[-1]["loaded"], "blocks_dropped": switches[-1]["dropped"],
                       "block_bytes": max(store.block_size.values())} if len(switches) > 1 else None,
        "resident_weight_bytes": weight_bytes(model) if config.quantize != "none" else resident_bytes(model),
        "peak_rss_bytes": _peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
    }


def _measure_interleaved(config: BenchConfig) -> dict[str, Any]:
    """All three variants in this one process, timed in turns: round r runs A B C, round r+1 B C A, ...

    Run one after another in their own processes, the variants met different machine conditions (another
    job starting, a CPU clocking down), and that drift went straight into their ratios. Interleaved, every
    round sees each variant under the same conditions, so a ratio is taken within a round and its spread
    over the rounds shows how much to trust it. (Memory is still measured one process per variant.)
    """
    import torch

    torch.set_num_threads(config.threads)
    loaded = {v: _load_variant(v, config) for v in VARIANTS}  # dense first: it writes the routed block cache
    for variant in loaded.values():
        variant.run(variant.prompts[128], 2)  # warm-up
    prefill: dict[str, dict[str, list[float]]] = {v: {str(n): [] for n in config.lengths} for v in VARIANTS}
    model_prefill: dict[str, dict[str, list[float]]] = {v: {str(n): [] for n in config.lengths} for v in VARIANTS}
    decode: dict[str, list[float]] = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()
    for round_index in range(config.repeats):
        shift = round_index % len(VARIANTS)
        for name in VARIANTS[shift:] + VARIANTS[:shift]:
            variant = loaded[name]
            for n in config.lengths:
                timing = variant.run(variant.prompts[n], 1)
                prefill[name][str(n)].append(timing["total"])
                model_prefill[name][str(n)].append(timing["generate"])
            decode[name].append(variant.run(variant.prompts[128], config.new_tokens)["total"])
    return {"rounds": config.repeats, "order": "rotated each round", "prefill_seconds": prefill,
            "prefill_model_seconds": model_prefill, "decode_seconds": decode,
            "blocks": {v: list(loaded[v].blocks) for v in VARIANTS}, "total_blocks":
            loaded["dense"].model.config.num_hidden_layers,
            "load_average": {"before": load_before, "after": os.getloadavg()}}


# --- the orchestrating process ---------------------------------------------------------------------------------


def _run_process(kind: str, config: BenchConfig, workdir: Path) -> dict[str, Any]:
    """Run one variant (or the interleaved timing, ``kind="interleaved"``) in a fresh Python process."""
    config_path, result_path = workdir / f"{kind}-config.json", workdir / f"{kind}-result.json"
    config_path.write_text(json.dumps(asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads)}
    command = [sys.executable, "-m", "pudding.evaluation.bench", kind, str(config_path), str(result_path)]
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    if process.returncode == USAGE_ERROR:  # the variant refused its input; its last line says why
        raise ConfigError(process.stderr.strip().splitlines()[-1])
    if process.returncode != 0:
        tail = (process.stderr or process.stdout).strip().splitlines()[-5:]
        raise ConfigError(f"bench {kind} failed: " + " | ".join(tail))
    return json.loads(result_path.read_text())


def compute_limit(total_blocks: int, omitted: int) -> float:
    """The largest speed-up skipping ``omitted`` of ``total_blocks`` blocks can give: every block's share.

    The embedding and the LM head run in both models and only lower the real ratio, so a measured ratio
    above this bound is a measurement error, not a result.
    """
    return total_blocks / (total_blocks - omitted)


def _paired(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """The ratio within each round, summarized over the rounds (median, quartiles, range)."""
    return _summary([a / b for a, b in zip(numerator, denominator, strict=True)])


def ratios(results: dict[str, dict], interleaved: dict[str, Any]) -> dict[str, Any]:
    """Speed ratios from the interleaved rounds (each a within-round ratio with its spread), memory ratios
    from the one-variant processes, and a flag for every speed ratio beyond what the skipped compute allows."""
    prefill, model_only, decode = (interleaved[key] for key in ("prefill_seconds", "prefill_model_seconds",
                                                                "decode_seconds"))
    lengths = list(prefill["dense"])
    speed = {
        "dense_over_routed_prefill": {n: _paired(prefill["dense"][n], prefill["routed"][n]) for n in lengths},
        "dense_over_static_prefill": {n: _paired(prefill["dense"][n], prefill["static"][n]) for n in lengths},
        "routed_over_static_prefill": {n: _paired(prefill["routed"][n], prefill["static"][n]) for n in lengths},
        "routed_model_only_over_static_prefill": {
            n: _paired(model_only["routed"][n], model_only["static"][n]) for n in lengths},
        "dense_over_routed_decode": _paired(decode["dense"], decode["routed"]),
    }
    limit = compute_limit(interleaved["total_blocks"], len(interleaved["blocks"]["routed"]))
    return {**speed,
            "compute_limit": limit,
            "measurement_errors": measurement_errors(speed, limit),
            "routed_over_dense_resident_weights": results["routed"]["resident_weight_bytes"]
            / results["dense"]["resident_weight_bytes"],
            "routed_over_dense_peak_rss": results["routed"]["peak_rss_bytes"] / results["dense"]["peak_rss_bytes"]}


SAME_COMPUTE_TOLERANCE = 0.05  # routed without its router vs static run the same blocks: beyond 5% is not compute


def measurement_errors(speed: dict[str, Any], limit: float) -> list[str]:
    """Every ratio that its compute cannot explain, as a sentence; an empty list when all are plausible."""
    errors = []
    for name in ("dense_over_routed_prefill", "dense_over_static_prefill"):
        for n, summary in speed[name].items():
            if summary["median"] > limit:
                errors.append(f"{name} at {n} tokens is {summary['median']:.3f}, above the compute limit "
                              f"{limit:.3f}")
    if speed["dense_over_routed_decode"]["median"] > limit:
        errors.append(f"dense_over_routed_decode is {speed['dense_over_routed_decode']['median']:.3f}, above the "
                      f"compute limit {limit:.3f}")
    for n, summary in speed["routed_model_only_over_static_prefill"].items():
        if abs(summary["median"] - 1) > SAME_COMPUTE_TOLERANCE:
            errors.append(f"routed_model_only_over_static_prefill at {n} tokens is {summary['median']:.3f}, but "
                          f"the two run identical compute (tolerance {SAME_COMPUTE_TOLERANCE:.0%})")
    return errors


def _check_before_running(config: BenchConfig) -> None:
    """What can be checked from the artifact and the model's config alone, before three processes load it."""
    from pudding.core.load import context_length, load_config
    from pudding.pool.artifact import artifact_folder
    from pudding.routing.model import read_config

    folder = artifact_folder(config.model)
    artifact = read_config(folder)
    check_lengths(config, context_length(load_config(artifact["base_model"]["spec"])))
    if config.tolerance is not None:  # refused here, not after a process has loaded the model
        from pudding.pool.artifact import CandidatePool
        from pudding.routing.adaptive import check_adaptive

        check_adaptive([e.k for e in CandidatePool.from_pretrained(folder).sets], artifact["router"].get("loss"))


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Memory per variant in its own process, speed ratios from one interleaved process; return (and write) them."""
    import tempfile

    _check_before_running(config)
    with tempfile.TemporaryDirectory() as tmp:
        # dense first: it writes the block cache that the routed variant (and the interleaved run) reads
        results = {v: _run_process(v, config, Path(tmp)) for v in VARIANTS}
        interleaved = _run_process("interleaved", config, Path(tmp))
    report = {"config": asdict(config), "variants": results, "interleaved": interleaved,
              "ratios": ratios(results, interleaved), "provenance": provenance()}
    if config.out:
        out = Path(config.out)
        atomic_write_json(out / "bench.json", report)
        atomic_write_text(out / "bench.md", render_markdown(report))
    return report


def _ratio(summary: dict[str, float]) -> str:
    return f"{summary['median']:.3f} [{summary['min']:.3f}-{summary['max']:.3f}]"


def render_markdown(report: dict[str, Any]) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    variants = report["variants"]
    lengths = list(variants["dense"]["prefill_seconds"])
    quantize = report["config"].get("quantize", "none")
    tolerance = report["config"].get("tolerance")
    routed_k = len(report["interleaved"]["blocks"]["routed"])
    lines = [f"# pudding bench{'' if quantize == 'none' else f', {quantize} model'} ({report['provenance']['date']}, "
             f"commit {report['provenance']['git'].get('commit', '?')[:10]})",
             "", f"Command: `{' '.join(report['provenance']['command'])}`", "",
             *([f"Adaptive depth: tolerance {tolerance:g} routes the bench prompt to a set of k={routed_k} "
                f"blocks, which static prunes too.", ""] if tolerance is not None else []),
             "| variant | " + " | ".join(f"pre-fill {n} tok (ms)" for n in lengths)
             + f" | {report['config']['new_tokens']} tokens (s) | router (ms) | set switch (ms) | weights (MB) "
               "| peak RSS (MB) |",
             "|---" * (len(lengths) + 6) + "|"]
    for name, v in variants.items():
        cells = [f"{ms(v['prefill_seconds'][n]['median'])} [{ms(v['prefill_seconds'][n]['q1'])}-"
                 f"{ms(v['prefill_seconds'][n]['q3'])}]" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['decode_seconds']['median']:.2f} | "
                     f"{ms(v['router_seconds']['median'])} | {ms(v['switch_seconds']['median'])} | "
                     f"{v['resident_weight_bytes'] / 1e6:.0f} | {v['peak_rss_bytes'] / 1e6:.0f} |")
    r = report["ratios"]
    switch = variants["routed"].get("set_switch")
    if switch:
        lines += ["", f"Set switch (routed, only the difference moves): {switch['blocks_loaded']} blocks loaded and "
                      f"{switch['blocks_dropped']} dropped in {ms(switch['seconds']['median'])} ms (median; "
                      f"{switch['block_bytes'] / 1e6:.1f} MB per block)."]
    lines += ["", "Table: each variant alone in its own process (medians over repeats, [interquartile range]).", "",
              f"Speed ratios, from one process timing the variants in turns ({report['interleaved']['rounds']} "
              "rounds, order rotated each round); each is the median of the within-round ratios, [its range "
              "over the rounds]:", "",
              *(f"- {label}: " + ", ".join(f"{n} tok {_ratio(x)}" for n, x in r[name].items())
                for name, label in (("dense_over_routed_prefill", "dense / routed pre-fill"),
                                    ("dense_over_static_prefill", "dense / static pre-fill"),
                                    ("routed_over_static_prefill", "routed / static pre-fill"),
                                    ("routed_model_only_over_static_prefill",
                                     "routed without the router and switch / static pre-fill"))),
              f"- dense / routed generation of {report['config']['new_tokens']} tokens: "
              f"{_ratio(r['dense_over_routed_decode'])}",
              f"- compute limit of any dense / pruned ratio: {r['compute_limit']:.3f}",
              f"- routed / dense resident weight bytes: {r['routed_over_dense_resident_weights']:.3f}",
              f"- routed / dense peak RSS: {r['routed_over_dense_peak_rss']:.3f}", ""]
    errors = r["measurement_errors"]
    lines += (["**Measurement errors** (ratios the skipped compute cannot explain; rerun on a quiet machine):", "",
               *(f"- {e}" for e in errors), ""] if errors else ["No ratio is beyond its compute limit.", ""])
    return "\n".join(lines)


def _variant_main(variant: str, config_file: str, result_file: str) -> int:
    """One variant, in a fresh process (see _run_process); a refused input is its message alone, no traceback."""
    settings = json.loads(Path(config_file).read_text())
    settings["lengths"] = tuple(settings["lengths"])
    try:
        config = BenchConfig(**settings)
        measure = _measure_interleaved(config) if variant == "interleaved" else _measure_variant(variant, config)
        Path(result_file).write_text(json.dumps(measure))
    except PuddingError as error:
        print(error, file=sys.stderr)
        return USAGE_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(_variant_main(*sys.argv[1:4]))
