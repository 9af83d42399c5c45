"""A subcommand's flags, generated from its stage's config dataclass: each setting is declared once.

A setting is declared on its config field alone: type (the annotation), default and help text, in
``field(metadata={...})``. This module turns those fields into argparse flags, and the parsed flags back into
the config, with no field-by-field copying in :mod:`pudding.cli`.

Why not transformers' ``HfArgumentParser``, the ecosystem's dataclass-to-argparse tool: it imports
transformers (and so torch), and it needs the dataclass itself, i.e. the config's module imported, and every
stage module imports torch. ``pudding <verb> --help`` and every argument error would then take seconds instead
of milliseconds. Its flags also keep the field names' underscores (``--max_length``), while pudding's flags,
which users and scripts rely on, use dashes, some under their own names (``--batch-tokens``), and negate the
booleans that default to true (``--no-progress``).

So the fields are read from the config's *source* with :mod:`ast`, without importing it: names, annotations,
defaults and metadata, where each default and metadata value is a literal or a module-level constant (followed
through ``from pudding... import NAME``). tests/test_cli_config.py checks, for every config the CLI uses, that
this reading equals ``dataclasses.fields()`` of the imported class, and that every field is a flag or is marked
internal, so the two cannot drift apart.

The metadata keys (all optional except ``help``/``internal``):

- ``help``: the flag's help text; a default that is not None or a boolean is appended as ``(default: ...)``;
- ``internal``: instead of ``help``, the reason the field has no flag (set by code, not by users);
- ``flag``: the flag when it is not ``--`` + the name with dashes (``--no-`` + that for a true boolean);
- ``type``: a converter of :data:`CONVERTERS` by name (``positive_int``, ``omission``, ``int_pair``, ...);
  without it the annotation decides (``int``, ``float``, else the text, which the config parses: tuples of
  names are comma-separated strings);
- ``choices``, ``metavar``: as in argparse; ``required``: the flag is required although the field has a default;
- ``append``: the flag may be repeated; its values become a tuple (not given: the field's default);
- ``one_of``: a group name; exactly one flag of the fields in that group must be given;
- ``nested`` (a class name of the same module) and ``what``: the field holds a config of its own, whose fields are
  flags too; the field's flag sets it to None (:func:`add_variant_flags`, ``StreamlineConfig.train``).

Besides literals and constants, a value may be ``tuple(REGISTRY)`` (the names of a module-level dict, whatever
it maps them to: ``"choices": tuple(EXECUTORS)``) or ``CONSTANT["key"]`` (one entry of a dict constant).
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
from dataclasses import dataclass, replace
from typing import Any

_NO_DEFAULT = object()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def omission(text: str) -> str:
    # Parsed later by the config (pudding.core.omit, which also reads none/dense), so a malformed set gets the
    # same one-line error as every other bad input.
    return text


def int_pair(text: str) -> tuple[int, int]:
    try:
        pair = tuple(int(b) for b in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"expected two integers like 1,1, got {text!r}")
    return pair


def none_or_text(text: str) -> str | None:
    """``none`` (any case) is None: the config's own "nowhere"."""
    return None if text.strip().lower() == "none" else text


CONVERTERS = {"positive_int": positive_int, "omission": omission, "int_pair": int_pair,
              "none_or_text": none_or_text, "int": int, "float": float, "str": str}


@dataclass(frozen=True)
class FieldSpec:
    """One config field as its source declares it."""

    name: str
    annotation: str  # as written; the configs use postponed annotations, so it is text at run time too
    default: Any  # _NO_DEFAULT when the field has none (or only a default_factory)
    metadata: dict
    inherited: bool = False  # declared on a base class (QuantizationFields): listed after the class's own flags

    @property
    def internal(self) -> bool:
        return "internal" in self.metadata

    @property
    def is_bool(self) -> bool:
        return self.annotation == "bool"

    @property
    def flag(self) -> str:
        if "flag" in self.metadata:
            return self.metadata["flag"]
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.is_bool and self.default is True else f"--{dashed}"


# --- reading a config class from its source ---------------------------------------------------------------


@functools.cache
def _module_tree(module: str) -> ast.Module:
    spec = importlib.util.find_spec(module)  # imports the (light) parent packages only, not the module
    if spec is None or spec.origin is None:
        raise LookupError(f"no module {module}")
    with open(spec.origin, encoding="utf-8") as handle:
        return ast.parse(handle.read(), spec.origin)


def _definition(module: str, name: str) -> tuple[str, ast.expr]:
    """``(module, expression)`` that assigns the module-level name ``name`` of ``module``, followed through imports."""
    for node in _module_tree(module).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return module, node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name \
                and node.value is not None:
            return module, node.value
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pudding"):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _definition(node.module, alias.name)
    raise LookupError(f"{module}.{name} is not a module-level constant")


def _constant(module: str, name: str) -> Any:
    """The value of the module-level constant ``name`` of ``module``, followed through imports."""
    return _value(*_definition(module, name))


def read_constant(module: str, name: str) -> Any:
    """A registry or other constant of ``module`` read from its source, without importing it (and torch)."""
    return _constant(module, name)


def _value(module: str, node: ast.expr) -> Any:
    """A literal, a module constant, or a tuple/list/dict of those; LookupError for anything else.

    ``tuple(REGISTRY)`` is the names of a module-level dict literal, whatever it maps them to (classes,
    functions): ``"choices": tuple(EXECUTORS)`` follows the registry itself, and the module stays unimported.
    """
    if isinstance(node, ast.Name):
        return _constant(module, node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tuple" \
            and len(node.args) == 1 and isinstance(node.args[0], ast.Name) and not node.keywords:
        where, target = _definition(module, node.args[0].id)
        if isinstance(target, ast.Dict) and None not in target.keys:
            return tuple(_value(where, key) for key in target.keys)
        return tuple(_value(where, target))
    if isinstance(node, ast.Tuple):
        return tuple(_value(module, e) for e in node.elts)
    if isinstance(node, ast.List):
        return [_value(module, e) for e in node.elts]
    if isinstance(node, ast.Subscript):  # COMMON_FIELDS["k"]: one entry of a dict constant
        return _value(module, node.value)[_value(module, node.slice)]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_value(module, k): _value(module, v) for k, v in zip(node.keys, node.values)}
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise LookupError(f"{module}: {ast.unparse(node)!r} is neither a literal nor a module constant") from None


def _class_target(module: str, class_name: str) -> str:
    """``"module:Class"`` where ``Class``, a name in ``module``, is defined: followed through
    ``from pudding.x import Class``."""
    tree = _module_tree(module)
    if any(isinstance(n, ast.ClassDef) and n.name == class_name for n in tree.body):
        return f"{module}:{class_name}"
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pudding"):
            for alias in node.names:
                if (alias.asname or alias.name) == class_name:
                    return _class_target(node.module, alias.name)
    raise LookupError(f"no class {class_name} in {module}")


@functools.cache
def config_fields(target: str) -> tuple[FieldSpec, ...]:
    """The fields of the dataclass ``"module:Class"``, read from its source (the module is not imported).

    A base class's fields come first, as in ``dataclasses.fields()``: the bases are pudding dataclasses
    (:class:`pudding.core.fields.QuantizationFields`), read the same way."""
    module, _, class_name = _class_target(*target.split(":")).partition(":")
    definition = next(n for n in _module_tree(module).body if isinstance(n, ast.ClassDef) and n.name == class_name)
    inherited = []
    for base in definition.bases:
        if not isinstance(base, ast.Name):
            raise LookupError(f"{target}: base {ast.unparse(base)!r} is not a plain class name")
        inherited.extend(replace(spec, inherited=True) for spec in config_fields(_class_target(module, base.id)))
    return (*inherited, *_own_fields(module, definition))


def _own_fields(module: str, definition: ast.ClassDef) -> list[FieldSpec]:
    specs = []
    for node in definition.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        annotation = ast.unparse(node.annotation)
        if annotation.startswith(("ClassVar", "typing.ClassVar")):
            continue
        default, metadata = _NO_DEFAULT, {}
        value = node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field":
            keywords = {k.arg: k.value for k in value.keywords}
            if "default" in keywords:
                default = _value(module, keywords["default"])
            if "metadata" in keywords:
                metadata = _value(module, keywords["metadata"])
        elif value is not None:
            default = _value(module, value)
        specs.append(FieldSpec(node.target.id, annotation, default, dict(metadata)))
    return specs


# --- flags from fields, and the config back from the parsed flags -------------------------------------------


def _converter(spec: FieldSpec):
    if "type" in spec.metadata:
        return CONVERTERS[spec.metadata["type"]]
    base = spec.annotation.replace(" | None", "").replace("None | ", "")
    return {"int": int, "float": float}.get(base, str)


def _shown(default: Any) -> str:
    return ",".join(map(str, default)) if isinstance(default, tuple) else str(default)


def _add_flag(parser, spec: FieldSpec, owner: str, only: str | None = None) -> None:
    """``only``: the flag belongs to some of a verb's configs (:func:`add_variant_flags`); it then defaults to
    None, "not given", so that the others can refuse it, and its help names the config's default."""
    meta = spec.metadata
    if "help" not in meta:
        raise LookupError(f"{owner}.{spec.name} has neither a help text nor an internal reason")
    text = meta["help"]
    if only is not None:
        shown = "" if spec.default in (None, _NO_DEFAULT) or spec.is_bool else f"; default: {_shown(spec.default)}"
        text = f"{text} ({only} only{shown})"
    if spec.is_bool:
        action = "store_false" if spec.default is True else "store_true"
        extra = {} if only is None else {"default": None}
        parser.add_argument(spec.flag, dest=spec.name, action=action, help=text, **extra)
        return
    # argparse names the value after dest; name it after the flag, as a hand-written flag would be
    metavar = None if "choices" in meta else spec.flag.lstrip("-").replace("-", "_").upper()
    kwargs: dict[str, Any] = {"dest": spec.name, "type": _converter(spec), "metavar": metavar}
    for key in ("choices", "metavar"):
        if key in meta:
            kwargs[key] = meta[key]
    if meta.get("append"):
        kwargs.update(action="append", default=None)
    elif only is not None:
        kwargs["default"] = None
    elif spec.default is _NO_DEFAULT or meta.get("required"):
        kwargs["required"] = True
    elif "one_of" in meta:  # one of a required group: its default is "not this one"
        kwargs["default"] = spec.default
    else:
        kwargs["default"] = spec.default
        if spec.default is not None and "default" not in text:
            text = f"{text} (default: {_shown(spec.default)})"
    parser.add_argument(spec.flag, help=text, **kwargs)


def add_config_flags(parser, target: str, *, skip: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Add a flag to ``parser`` for every field of the config ``target`` (``"module:Class"``) except the internal
    ones and ``skip`` (fields the verb sets itself); record them for :func:`build_config`. Returns their names."""
    names, groups = [], {}
    for spec in sorted(config_fields(target), key=lambda spec: spec.inherited):  # stable: own fields first
        if not spec.internal and spec.name not in skip:
            if "nested" in spec.metadata:
                raise LookupError(f"{target}.{spec.name}: a nested config's flags come from add_variant_flags")
            group = spec.metadata.get("one_of")
            if group is not None and group not in groups:
                groups[group] = parser.add_mutually_exclusive_group(required=True)
            _add_flag(groups.get(group, parser), spec, target)
            names.append(spec.name)
    parser.set_defaults(config_target=target, config_flags=tuple(names))
    return tuple(names)


def add_shared_flag(parser, name: str, module: str, constant: str, *, annotation: str = "str",
                    default: Any = _NO_DEFAULT) -> None:
    """A flag for a verb without a config dataclass, from field metadata that ``module`` declares once as the
    constant ``constant`` (e.g. ``QUANTIZE_FIELD`` of :mod:`pudding.core.quantize`, which the configs use)."""
    _add_flag(parser, FieldSpec(name, annotation, default, dict(_constant(module, constant))), f"{module}.{constant}")


def build_config(args: argparse.Namespace, **fixed: Any):
    """The verb's config from its parsed flags (``fixed`` adds what the verb sets itself); the config's own
    ``__post_init__`` validates it. A repeatable flag that was not given leaves the field's default."""
    module, _, class_name = args.config_target.partition(":")
    config_class = getattr(importlib.import_module(module), class_name)
    values = {}
    for name in args.config_flags:
        value = getattr(args, name)
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and any(s.name == name and s.metadata.get("append")
                                   for s in config_fields(args.config_target)):
            continue
        values[name] = value
    return config_class(**values, **fixed)


# --- a verb whose config class is chosen by a flag (`pudding compress --method`) ---------------------------


@dataclass(frozen=True)
class _VariantFlag:
    spec: FieldSpec
    owners: tuple[str, ...]  # the variants whose config has the field (all of them: a shared flag)
    nested_in: str | None = None  # the field of ``nested`` metadata this field's config is built into


def _nested_target(target: str, spec: FieldSpec) -> str:
    # ``nested`` names a config class of the same module (the field's annotation is ``Class | None``).
    module = target.partition(":")[0]
    return spec.metadata["nested"] if ":" in spec.metadata["nested"] else f"{module}:{spec.metadata['nested']}"


def add_variant_flags(parser, targets: dict[str, str], selector: str) -> None:
    """Flags for a verb with one config class per variant, chosen by the flag ``selector`` (which the verb adds;
    ``targets`` maps each variant to its ``"module:Class"``, e.g. from a registry read by :func:`read_constant`).

    A field several variants' configs have is one flag, declared once: their declarations (metadata, default)
    must agree, else LookupError. A field of some variants only is a flag that defaults to None ("not given"),
    which :func:`build_variant_config` refuses for the other variants. A field with ``nested`` metadata holds a
    config of its own (``StreamlineConfig.train: TrainSettings | None``): its flag (``--no-train``) sets it to
    None, and that config's fields are flags too, of the same variants; ``what`` says what they set up.
    """
    flags: dict[str, _VariantFlag] = {}

    def declare(spec: FieldSpec, owner: str, variant: str, nested_in: str | None = None) -> None:
        if spec.internal:
            return
        known = flags.get(spec.name)
        if known is None:
            flags[spec.name] = _VariantFlag(spec, (variant,), nested_in)
        elif (known.spec.metadata, known.spec.default, known.nested_in) != (spec.metadata, spec.default, nested_in):
            raise LookupError(f"{owner}.{spec.name} is declared unlike the same field of {known.owners[0]}'s config")
        else:
            flags[spec.name] = _VariantFlag(known.spec, (*known.owners, variant), nested_in)

    nested_targets = []
    for variant, target in targets.items():
        for spec in config_fields(target):
            declare(spec, target, variant)
            if "nested" in spec.metadata:
                nested_targets.append(_nested_target(target, spec))
                for inner in config_fields(nested_targets[-1]):
                    declare(inner, nested_targets[-1], variant, nested_in=spec.name)
    for name, flag in flags.items():
        only = None if len(flag.owners) == len(targets) else f"{selector} {'/'.join(flag.owners)}"
        if "nested" in flag.spec.metadata:
            parser.add_argument(flag.spec.flag, dest=name, action="store_true", default=None,
                                help=flag.spec.metadata["help"] + (f" ({only} only)" if only else ""))
        else:
            _add_flag(parser, flag.spec, "/".join(targets.values()), only=only)
    parser.set_defaults(config_variants=dict(targets), variant_flags=flags, variant_selector=selector,
                        config_targets=tuple(dict.fromkeys([*targets.values(), *nested_targets])))


def build_variant_config(args: argparse.Namespace, variant: str, config_class: type):
    """The config of ``variant`` (``config_class``, which the verb resolved, e.g. through its registry) from the
    flags of :func:`add_variant_flags`. ConfigError (one line) for a flag of another variant, or for a nested
    config's flag beside the flag that turns that config off."""
    from pudding.core.errors import ConfigError

    flags, selector = args.variant_flags, args.variant_selector
    for name, flag in flags.items():
        if variant not in flag.owners and getattr(args, name) is not None:
            raise ConfigError(f"{flag.spec.flag} does not apply to {selector} {variant}")
    mine = {name: flag for name, flag in flags.items() if variant in flag.owners}
    values = {name: getattr(args, name) for name, flag in mine.items()
              if flag.nested_in is None and "nested" not in flag.spec.metadata and getattr(args, name) is not None}
    for name, flag in mine.items():
        if "nested" not in flag.spec.metadata:
            continue
        inner = {n: getattr(args, n) for n, f in mine.items() if f.nested_in == name and getattr(args, n) is not None}
        if getattr(args, name):  # off
            if inner:
                raise ConfigError(f"{mine[next(iter(inner))].spec.flag} sets up {flag.spec.metadata['what']}, "
                                  f"which {flag.spec.flag} skips")
            values[name] = None
        else:  # the nested config's own defaults, with what was given
            module, _, class_name = _nested_target(args.config_variants[variant], flag.spec).partition(":")
            values[name] = getattr(importlib.import_module(module), class_name)(**inner)
    return config_class(**values)
