"""Stage 2 of the pipeline: run a model with whole transformer blocks omitted.

An omitted block is never executed; the residual stream passes straight through it. We do this without
touching any upstream ``forward``: the model's block list is re-listed with only the kept blocks, and the
three things newer transformers derives from the layer count are kept consistent with it:

- ``config.num_hidden_layers``: the decoder loops over ``layers[:num_hidden_layers]`` and the KV cache is
  pre-built with one entry per layer;
- per-layer config lists (``config.layer_types``): each layer picks its attention mask by its position in
  that list, and the cache picks a sliding or full layer from it;
- every module's ``layer_idx``: attention modules index the KV cache by it, so kept blocks are renumbered
  0..n_kept-1.

Two entry points:

- :func:`omit_blocks` is a context manager that edits the model in place and restores it exactly on exit;
- :func:`prune_blocks` returns a smaller model that no longer holds the omitted blocks.

Architectures are dispatched on ``config.model_type`` through :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from pudding.errors import ConfigError, UnknownNameError

OmissionSet = tuple[int, ...]
"""A sorted tuple of distinct 0-based block indices. Immutable, so it can key dicts and be shared."""


@dataclass(frozen=True)
class Architecture:
    """How to find and re-list the decoder blocks of one ``config.model_type``.

    Attributes:
        model_type: the ``config.model_type`` this entry serves.
        blocks_path: dotted attribute path from the ``*ForCausalLM`` module to its block ``ModuleList``.
        per_layer_fields: config attributes that hold one entry per block and must be re-listed with them.
        add_bos_token: whether likelihood scoring should prepend BOS, as lm-evaluation-harness does for
            this family (Gemma is trained to always see it).
        check: optional validation of a config that this entry cannot handle exactly; raises ConfigError.
    """

    model_type: str
    blocks_path: str
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    add_bos_token: bool = False
    check: Callable[[object], None] | None = field(default=None, compare=False)


def _check_gpt2(config) -> None:
    # With this flag GPT-2 scales attention by 1/(layer_idx+1), so a block's function depends on its index
    # and no renumbering keeps the kept blocks exact. Refuse rather than silently change the model.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True: each block's output depends on its index, "
            "so blocks cannot be omitted exactly"
        )


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(arch: Architecture) -> Architecture:
    """Add ``arch`` to the registry (replacing any entry for the same model_type) and return it."""
    ARCHITECTURES[arch.model_type] = arch
    return arch


for _arch in (
    Architecture("llama", "model.layers"),
    Architecture("mistral", "model.layers"),
    Architecture("qwen2", "model.layers"),
    Architecture("qwen3", "model.layers"),
    Architecture("gemma", "model.layers", add_bos_token=True),
    Architecture("gemma2", "model.layers", add_bos_token=True),
    Architecture("gemma3_text", "model.layers", add_bos_token=True),
    Architecture("phi3", "model.layers"),
    Architecture("opt", "model.decoder.layers"),
    Architecture("gpt2", "transformer.h", check=_check_gpt2),
    Architecture("gpt_neox", "gpt_neox.layers"),
):
    register_architecture(_arch)


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that pudding can omit blocks from, sorted."""
    return sorted(ARCHITECTURES)


def get_architecture(config) -> Architecture:
    """Return the registry entry for ``config.model_type``; raise UnknownNameError listing supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnknownNameError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    arch = ARCHITECTURES[model_type]
    if getattr(config, "is_heterogeneous", False):
        raise ConfigError(f"{model_type}: heterogeneous per-layer configs are not supported")
    if arch.check is not None:
        arch.check(config)
    return arch


def _resolve_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, leaf = path.split(".")
    owner = model
    for name in parents:
        owner = getattr(owner, name)
    return owner, leaf


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder block list (the live one, shortened while blocks are omitted)."""
    owner, leaf = _resolve_parent(model, get_architecture(model.config).blocks_path)
    return getattr(owner, leaf)


def num_blocks(model: nn.Module) -> int:
    """Number of decoder blocks the model has right now."""
    return len(get_blocks(model))


def validate_omission(blocks: Iterable[int] | str | None, total: int | None) -> OmissionSet:
    """Check an omission set against a model with ``total`` blocks and return it as a sorted tuple.

    Accepts any iterable of ints, or a comma-separated string such as ``"20,21"``. ``None`` and ``""`` mean
    no block is omitted. Raises ConfigError naming the problem for: non-integers, indices out of
    ``[0, total)``, duplicates, or omitting every block. With ``total=None`` (the model is not known yet)
    only what needs no model is checked: integers, non-negative, no duplicates.

    >>> validate_omission([21, 20], 30)
    (20, 21)
    """
    if blocks is None:
        return ()
    if isinstance(blocks, str):
        blocks = parse_block_list(blocks)
    if isinstance(blocks, (int, float, bytes)) or not isinstance(blocks, Iterable):
        raise ConfigError(f"omission set must be a collection of block indices, got {type(blocks).__name__}")
    items = list(blocks)
    bad = [b for b in items if isinstance(b, bool) or not isinstance(b, int)]
    if bad:
        raise ConfigError(f"omission set must hold integer block indices, got {bad[0]!r}")
    _check_range(items, total)
    duplicates = sorted({b for b in items if items.count(b) > 1})
    if duplicates:
        raise ConfigError(f"omission set lists blocks {duplicates} more than once")
    if total is not None and len(items) >= total:
        raise ConfigError(f"cannot omit all {total} blocks: at least one must be kept")
    return tuple(sorted(items))


def _check_range(items: list[int], total: int | None) -> None:
    if total is None:
        negative = sorted(b for b in items if b < 0)
        if negative:
            raise ConfigError(f"block indices must be non-negative (0-based), got {negative}")
        return
    out_of_range = sorted(b for b in items if not 0 <= b < total)
    if out_of_range:
        raise ConfigError(f"blocks {out_of_range} are out of range: the model has blocks 0..{total - 1}")


def parse_block_list(text: str) -> list[int]:
    """Parse "20, 21" into [20, 21]; ConfigError on anything that is not an integer."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"omission set {text!r} must be comma-separated block indices, e.g. '20,21'") from None


@dataclass
class _SavedState:
    owner: nn.Module
    leaf: str
    blocks: nn.ModuleList
    layer_idx: list[tuple[nn.Module, int]]
    config_fields: dict[str, object]


# Models currently inside omit_blocks. A registry rather than an attribute on the model, so we never stick
# ad-hoc attributes on HF modules; weak, so it never keeps a model alive.
_ACTIVE: weakref.WeakSet = weakref.WeakSet()


def _apply_omission(model: nn.Module, arch: Architecture, omission: OmissionSet) -> _SavedState:
    owner, leaf = _resolve_parent(model, arch.blocks_path)
    blocks = getattr(owner, leaf)
    kept = [i for i in range(len(blocks)) if i not in omission]
    config = model.config
    saved = _SavedState(owner, leaf, blocks, [], {"num_hidden_layers": config.num_hidden_layers})
    for name in arch.per_layer_fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == len(blocks):
            saved.config_fields[name] = value
            setattr(config, name, type(value)(value[i] for i in kept))
    for new_index, old_index in enumerate(kept):
        for module in blocks[old_index].modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                saved.layer_idx.append((module, module.layer_idx))
                module.layer_idx = new_index
    config.num_hidden_layers = len(kept)
    setattr(owner, leaf, nn.ModuleList([blocks[i] for i in kept]))
    return saved


def _restore(model: nn.Module, saved: _SavedState) -> None:
    setattr(saved.owner, saved.leaf, saved.blocks)
    for module, index in saved.layer_idx:
        module.layer_idx = index
    for name, value in saved.config_fields.items():
        setattr(model.config, name, value)


@contextmanager
def omit_blocks(model: nn.Module, blocks: Iterable[int] | str | None) -> Iterator[nn.Module]:
    """Run ``model`` with ``blocks`` omitted; restore it exactly on exit, even on an exception.

    Indices are 0-based positions in the full model. Inside the context the model is a valid smaller model:
    ``forward`` and ``generate`` (with or without KV cache) behave exactly as a model built with only the kept
    blocks. The model is edited in place, so do not use it from another thread meanwhile, and do not nest
    this context on the same model (pass the union of the blocks instead).

    Example::

        with omit_blocks(model, [20, 21]) as smaller:
            logits = smaller(input_ids).logits
    """
    arch = get_architecture(model.config)
    omission = validate_omission(blocks, num_blocks(model))
    if model in _ACTIVE:
        raise ConfigError("omit_blocks is already active on this model; pass the union of the blocks instead")
    if not omission:
        yield model
        return
    saved = _apply_omission(model, arch, omission)
    _ACTIVE.add(model)
    try:
        yield model
    finally:
        _ACTIVE.discard(model)
        _restore(model, saved)


def prune_blocks(model: nn.Module, blocks: Iterable[int] | str, *, inplace: bool = False) -> nn.Module:
    """Return a model permanently without ``blocks``.

    With ``inplace=False`` (default) ``model`` is left untouched and the result is a new model that shares
    nothing with it; only the kept blocks are copied, so peak memory is the original plus the kept part.
    With ``inplace=True`` ``model`` itself is shrunk and returned, and the omitted blocks are freed once no
    one else refers to them.
    """
    arch = get_architecture(model.config)
    omission = validate_omission(blocks, num_blocks(model))
    if inplace:
        _apply_omission(model, arch, omission)
        return model
    with omit_blocks(model, omission):
        return copy.deepcopy(model)
