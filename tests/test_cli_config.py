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
TARGETS = sorted(set(CONFIG_VERBS.values()))


def _imported(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def test_the_converted_verbs_are_generated():
    assert {"eval", "candidates", "baselines", "importance", "label", "train-router", "reproduce",
            "bench"} <= set(CONFIG_VERBS)


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
            "for v in p.verbs.values(): v.format_help()\n"
            "sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
