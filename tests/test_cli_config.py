"""The CLI's flags are generated from the stage configs' fields (pudding.cli_config): declared once, no drift."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest

from pudding.cli import build_parser
from pudding.cli_config import _NO_DEFAULT, config_fields

VERBS = build_parser().verbs
CONFIG_VERBS = {name: p.get_default("config_target") for name, p in VERBS.items() if p.get_default("config_target")}
# verbs with one config per variant (compress --method), with the configs nested in them (TrainSettings)
VARIANT_VERBS = {name: p.get_default("config_targets") for name, p in VERBS.items() if p.get_default("config_targets")}
TARGETS = sorted(set(CONFIG_VERBS.values()) | {t for targets in VARIANT_VERBS.values() for t in targets})


def _imported(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def test_the_converted_verbs_are_generated():
    assert {"eval", "candidates", "baselines", "importance", "label", "train-router", "reproduce",
            "bench", "heal", "serve"} <= set(CONFIG_VERBS)
    assert set(VARIANT_VERBS["compress"]) == {"pudding.pruning.laco:LacoConfig",
                                              "pudding.pruning.streamline:StreamlineConfig",
                                              "pudding.pruning.streamline:TrainSettings"}


@pytest.mark.parametrize("target", TARGETS)
def test_reading_the_source_agrees_with_the_imported_dataclass(target):
    """The CLI reads fields without importing the module; this is what Python makes of the same class."""
    read = {spec.name: spec for spec in config_fields(target)}
    real = dataclasses.fields(_imported(target))
    assert list(read) == [f.name for f in real]
    for f in real:
        spec = read[f.name]
        assert spec.annotation == f.type, f.name
        assert spec.metadata == dict(f.metadata), f.name
        default = _NO_DEFAULT if f.default is dataclasses.MISSING else f.default
        assert spec.default == default, f.name


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_field_is_a_flag_or_internal_with_a_reason(target):
    exposed = set()
    for verb, verb_target in CONFIG_VERBS.items():
        if verb_target == target:
            exposed |= {a.dest for a in VERBS[verb]._actions}
    for verb, verb_targets in VARIANT_VERBS.items():
        if target in verb_targets:
            exposed |= {a.dest for a in VERBS[verb]._actions}
    for spec in config_fields(target):
        if spec.internal:
            assert isinstance(spec.metadata["internal"], str) and spec.metadata["internal"].strip(), spec.name
            assert spec.name not in exposed, f"{spec.name} is marked internal but has a flag"
        else:
            assert spec.name in exposed, f"{target}.{spec.name} has no flag and is not marked internal"
            assert spec.metadata.get("help"), f"{target}.{spec.name} has no help text"


@pytest.mark.parametrize("verb", sorted(CONFIG_VERBS))
def test_defaults_of_the_flags_are_the_configs_defaults(verb, tmp_path):
    """A verb run with only its required flags gets exactly the config's own defaults."""
    target = CONFIG_VERBS[verb]
    required = [s for s in config_fields(target)
                if not s.internal and (s.default is _NO_DEFAULT or s.metadata.get("required"))]
    groups = {}  # a required one-of group: give its first flag
    for spec in config_fields(target):
        groups.setdefault(spec.metadata.get("one_of"), spec)
    required += [spec for group, spec in groups.items() if group is not None]
    argv = [verb] + [x for s in required for x in (s.flag, str(tmp_path / s.name))]
    args = build_parser().parse_args(argv)
    given = {s.name: str(tmp_path / s.name) for s in required}
    skipped = {s.name for s in config_fields(target)} - set(args.config_flags)
    for spec in config_fields(target):
        if spec.name in args.config_flags and spec.name not in given and not spec.metadata.get("append") \
                and "one_of" not in spec.metadata:
            assert getattr(args, spec.name) == spec.default, (verb, spec.name)
    assert all(s.internal or verb == "baselines" for s in config_fields(target) if s.name in skipped)


def test_eval_builds_its_config_generically(tiny_dir, tmp_path):
    from pudding.cli_config import build_config
    from pudding.evaluation.zero_shot import EvalConfig

    args = build_parser().parse_args(["eval", "--model", tiny_dir, "--omit", "none", "--omit", "1,2", "--limit",
                                      "3", "--batch-tokens", "64", "--no-progress", "--output-dir", str(tmp_path)])
    config = build_config(args)
    assert config == EvalConfig(model=tiny_dir, omissions=((), (1, 2)), limit=3, max_batch_tokens=64,
                                progress=False, output_dir=str(tmp_path))
    assert build_config(build_parser().parse_args(["eval"])) == EvalConfig()


def test_pool_flags_keep_their_names_and_meaning(tmp_path):
    from pudding.cli_config import build_config
    from pudding.core.tasks import PAPER_TASKS
    from pudding.pruning.candidates import PoolConfig

    args = build_parser().parse_args(["candidates", "--out", str(tmp_path), "--barriers", "2,1", "--k", "3",
                                      "--no-prefix-reuse", "--batch-tokens", "128", "--tasks", "piqa"])
    assert build_config(args) == PoolConfig(out=str(tmp_path), barriers=(2, 1), k=3, reuse_prefix=False,
                                            max_batch_tokens=128, tasks=("piqa",))
    assert build_config(build_parser().parse_args(["importance", "--out", "x"])).tasks == PAPER_TASKS


@pytest.mark.parametrize("argv, words", [
    (["candidates", "--out", "x", "--barriers", "1"], ["two integers", "pudding candidates --help"]),
    (["label", "--out", "x"], ["--pool", "pudding label --help"]),
    (["train-router", "--labels", "l", "--pool", "p", "--out", "o", "--loss", "x"], ["invalid choice"]),
    (["reproduce", "--budget", "huge"], ["invalid choice"]),
    (["candidates", "--out", "x", "--k", "0"], ["positive integer"]),
])
def test_generated_flags_reject_bad_values_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_reproduce_reuse_none_means_nowhere():
    assert build_parser().parse_args(["reproduce", "--reuse", "none"]).reuse is None
    assert build_parser().parse_args(["reproduce", "--reuse", "results/x"]).reuse == "results/x"


def test_literal_choices_match_their_registries():
    from pudding.core.fields import QUANTIZE_FIELD
    from pudding.core.quantize import QUANTIZATIONS
    from pudding.evaluation.reproduce import BUDGETS, ReproduceConfig

    assert set(QUANTIZE_FIELD["choices"]) == set(QUANTIZATIONS)
    budget = {f.name: f for f in dataclasses.fields(ReproduceConfig)}["budget"]
    assert set(budget.metadata["choices"]) == set(BUDGETS)


def test_every_verbs_help_stays_free_of_torch():
    """The flags come from the configs' source, not from importing them: each verb's --help is instant."""
    code = ("import sys, pudding.cli as c; p = c.build_parser()\n"
            "helps = {name: v.format_help() for name, v in p.verbs.items()}\n"
            "assert '--max-batch-size' in helps['serve'] and '--train-steps' in helps['compress']\n"
            "assert '{local,ray}' in helps['label']\n"
            "sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_registry_is_read_as_its_names():
    """``"choices": tuple(EXECUTORS)`` follows the registry (a dict of classes) without importing it."""
    from pudding.pool.executor import EXECUTORS

    for target in ("pudding.pruning.candidates:PoolConfig", "pudding.routing.labels:LabelConfig",
                   "pudding.evaluation.reproduce:ReproduceConfig"):
        executor = {s.name: s for s in config_fields(target)}["executor"]
        assert executor.metadata["choices"] == tuple(EXECUTORS) == ("local", "ray")


def test_serve_settings_come_from_their_flags():
    from pudding.cli_config import build_config
    from pudding.serving.server import ServeSettings

    assert build_config(build_parser().parse_args(["serve"])) == ServeSettings()
    args = build_parser().parse_args(["serve", "--max-batch-size", "4", "--force-set", "2", "--batch-window-ms", "0",
                                      "--served-model-name", "x", "--max-prompt-tokens", "100", "--port", "9000"])
    assert build_config(args) == ServeSettings(max_batch_size=4, force_set=2, batch_window_ms=0.0, model_name="x",
                                               max_prompt_tokens=100)
    assert (args.port, args.host) == (9000, "127.0.0.1")


def _compress(*argv):
    from pudding.cli import _compress_config

    return _compress_config(build_parser().parse_args(["compress", "--out", "x", *argv]))[0]


def test_compress_flags_build_each_methods_config():
    from pudding.pruning.laco import LacoConfig
    from pudding.pruning.streamline import StreamlineConfig, TrainSettings

    assert _compress("--method", "laco") == LacoConfig(out="x")
    assert _compress("--method", "streamline") == StreamlineConfig(out="x")
    assert _compress("--method", "laco", "--k", "2", "--merge-layers", "3", "--rule", "released_code",
                     "--barriers", "2,1", "--batch-tokens", "64", "--no-progress") == \
        LacoConfig(out="x", k=2, merge_layers=3, rule="released_code", barriers=(2, 1), max_batch_tokens=64,
                   progress=False)
    assert _compress("--method", "streamline", "--train-steps", "5", "--lr", "0.1", "--seed", "3") == \
        StreamlineConfig(out="x", train=TrainSettings(steps=5, lr=0.1, seed=3))
    assert _compress("--method", "streamline", "--no-train", "--samples", "4") == \
        StreamlineConfig(out="x", train=None, samples=4)


def test_compress_refuses_every_flag_of_the_other_method():
    from pudding.core.errors import ConfigError

    flags = build_parser().verbs["compress"].get_default("variant_flags")
    checked = 0
    for name, flag in flags.items():
        for method in {"laco", "streamline"} - set(flag.owners):
            valued = not flag.spec.is_bool and "nested" not in flag.spec.metadata
            argv = ["--method", method, flag.spec.flag] + (["rdsc" if name == "rule" else "1"] if valued else [])
            with pytest.raises(ConfigError, match=f"^{flag.spec.flag} does not apply to --method {method}$"):
                _compress(*argv)
            checked += 1
    assert checked >= 16  # laco's 5 and streamline's --no-train with its 10 TrainSettings flags


def test_a_field_shared_by_variants_must_be_declared_alike():
    import argparse

    from pudding.cli_config import add_variant_flags

    with pytest.raises(LookupError, match="declared unlike"):  # both have `model`, with other help texts
        add_variant_flags(argparse.ArgumentParser(), {"a": "pudding.routing.labels:LabelConfig",
                                                      "b": "pudding.evaluation.zero_shot:EvalConfig"}, "--x")
