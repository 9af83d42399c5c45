"""Run a model with whole transformer blocks omitted.

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

**Sub-layers.** ``omit_blocks`` also skips a block's attention or its MLP alone (``"3,12.attn,14.mlp"``, see
:class:`Omission`). The sub-layer module is swapped, for the context only, for one that returns zeros of the
right structure, so the block adds nothing to the residual stream there; no upstream ``forward`` is copied.
A skipped attention keeps no KV cache: its cache layer becomes transformers' own ``DummyLayer`` (the layer
type newer transformers uses for blocks without attention), which the cache's length and mask lookups skip.

Architectures are dispatched on ``config.model_type`` through :data:`ARCHITECTURES`.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from pudding.core.errors import ConfigError, UnknownNameError

OmissionSet = tuple[int, ...]
"""A sorted tuple of distinct 0-based block indices. Immutable, so it can key dicts and be shared."""

SUBLAYERS = ("attn", "mlp")
"""The sub-layers of a block that can be skipped alone, in their order inside the block."""


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
        attention_path: attribute path, inside a block, of its self-attention module.
        mlp_paths: attribute paths, inside a block, of the module(s) that make its MLP's residual contribution,
            in call order. One module for most families; OPT computes its MLP inline with ``fc1`` and ``fc2``.
        sublayer_check: optional validation that skipping a sub-layer is a residual pass-through for this
            config (it is not for post-norm blocks); raises ConfigError.
    """

    model_type: str
    blocks_path: str
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    add_bos_token: bool = False
    check: Callable[[object], None] | None = field(default=None, compare=False)
    attention_path: str = "self_attn"
    mlp_paths: tuple[str, ...] = ("mlp",)
    sublayer_check: Callable[[object], None] | None = field(default=None, compare=False)


def _check_gpt2(config) -> None:
    # With this flag GPT-2 scales attention by 1/(layer_idx+1), so a block's function depends on its index
    # and no renumbering keeps the kept blocks exact. Refuse rather than silently change the model.
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(
            "gpt2 with scale_attn_by_inverse_layer_idx=True: each block's output depends on its index, "
            "so blocks cannot be omitted exactly"
        )


def _check_opt_sublayers(config) -> None:
    # Post-norm OPT (350m) normalises *after* each residual add, so a zero sub-layer output still passes
    # through a LayerNorm: that is not skipping the sub-layer.
    if not getattr(config, "do_layer_norm_before", True):
        raise ConfigError("opt with do_layer_norm_before=False (post-norm): skipping an attention or MLP sub-layer "
                          "alone is not a residual pass-through; omit whole blocks instead")


def _check_sandwich_norm(config) -> None:
    # Gemma 2/3 normalise each sub-layer's *output* before the residual add. RMSNorm maps zeros to exact zeros
    # (0 * rsqrt(0 + eps)), so the pass-through stays exact, but only while eps > 0.
    if not getattr(config, "rms_norm_eps", 0) > 0:
        raise ConfigError(f"{config.model_type} with rms_norm_eps={getattr(config, 'rms_norm_eps', None)}: a skipped "
                          "sub-layer's zeros would not survive its output norm; omit whole blocks instead")


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
    Architecture("gemma2", "model.layers", add_bos_token=True, sublayer_check=_check_sandwich_norm),
    Architecture("gemma3_text", "model.layers", add_bos_token=True, sublayer_check=_check_sandwich_norm),
    Architecture("phi3", "model.layers"),
    Architecture("opt", "model.decoder.layers", mlp_paths=("fc1", "fc2"), sublayer_check=_check_opt_sublayers),
    Architecture("gpt2", "transformer.h", check=_check_gpt2, attention_path="attn"),
    Architecture("gpt_neox", "gpt_neox.layers", attention_path="attention"),
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

    The one check of a whole-block set, wherever one comes from (CLI, config, pool.json, lm-eval's model_args).
    Accepts any iterable of ints, or a comma-separated string such as ``"20,21"``. ``None``, ``""``, ``"none"``
    and ``"dense"`` mean no block is omitted. Raises ConfigError naming the problem for: non-integers, indices out of
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


DENSE_WORDS = ("none", "dense")
"""What a user may write for the empty omission set (no block omitted), in any case."""


def parse_block_list(text: str) -> list[int]:
    """Parse "20, 21" into [20, 21], and "none" or "dense" into []; ConfigError on anything that is not an integer.

    The one parser of a whole-block set's text; :func:`validate_omission` and :func:`parse_omission` use it.
    """
    if text.strip().lower() in DENSE_WORDS:
        return []
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return [int(p) for p in parts]
    except ValueError:
        hint = " (sub-layers such as '12.attn' are for omit_blocks and pudding eval only)" if "." in text else ""
        raise ConfigError(f"omission set {text!r} must be comma-separated block indices, e.g. '20,21'{hint}") from None


SubLayer = tuple[int, str]
"""One block's attention or MLP: ``(12, "attn")``, written ``"12.attn"``."""


@dataclass(frozen=True)
class Omission:
    """An omission set that may name single sub-layers beside whole blocks, e.g. ``"3,12.attn,14.mlp"``.

    Built by :func:`parse_omission`, which normalises it: a block named with both of its sub-layers becomes the
    whole block, and no sub-layer of a whole omitted block is listed.

    Attributes:
        blocks: whole blocks omitted, a sorted :data:`OmissionSet`.
        sublayers: ``(block, "attn" | "mlp")`` pairs skipped alone, sorted by block then by :data:`SUBLAYERS`.
    """

    blocks: OmissionSet = ()
    sublayers: tuple[SubLayer, ...] = ()

    @property
    def key(self) -> tuple[int | str, ...]:
        """The canonical, immutable, JSON-ready form: whole blocks as ints and sub-layers as ``"12.attn"``, in
        block order. For a whole-block set it *is* the plain sorted tuple of ints used everywhere else.

        >>> parse_omission("14.mlp,3,12.attn", 30).key
        (3, '12.attn', '14.mlp')
        """
        items = [((b, 0), b) for b in self.blocks]
        items += [((b, 1 + SUBLAYERS.index(name)), f"{b}.{name}") for b, name in self.sublayers]
        return tuple(item for _, item in sorted(items))

    def __str__(self) -> str:
        return ",".join(map(str, self.key))


def _has_sublayer_syntax(spec) -> bool:
    if isinstance(spec, str):
        return "." in spec
    return isinstance(spec, Iterable) and any(isinstance(item, str) for item in spec)


def _parse_item(item) -> int | SubLayer:
    """``3`` or ``"3"`` as the block 3, ``"12.attn"`` as ``(12, "attn")``; ConfigError for anything else."""
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise ConfigError(f"omission set must hold block indices or sub-layers like '12.attn', got {item!r}")
    if isinstance(item, int):
        return item
    block, dot, name = item.strip().partition(".")
    if dot and name not in SUBLAYERS:
        raise ConfigError(f"unknown sub-layer {name!r} in {item.strip()!r}; a block's sub-layers are "
                          f"{', '.join(SUBLAYERS)} (e.g. '12.attn')")
    try:
        index = int(block)
    except ValueError:
        raise ConfigError(f"omission item {item.strip()!r} must be a block index ('12') or a sub-layer "
                          "('12.attn', '12.mlp')") from None
    return (index, name) if dot else index


def parse_omission(spec, total: int | None) -> Omission:
    """Check an omission set that may name sub-layers, against a model with ``total`` blocks; normalise it.

    ``spec`` is a comma-separated string (``"3,12.attn"``), an iterable of block indices and ``"12.mlp"``-style
    strings, an :class:`Omission`, or None / ``""`` / ``"none"`` / ``"dense"`` (nothing omitted). A set without
    sub-layers is checked by :func:`validate_omission`, with the same messages. Raises ConfigError naming the
    problem for: unknown sub-layer names, indices out of ``[0, total)``, an item listed twice, a block listed
    both whole and by a sub-layer, or omitting every block. ``total=None`` checks only what needs no model.

    >>> parse_omission("12.mlp,3,12.attn", 30)
    Omission(blocks=(3, 12), sublayers=())
    """
    if isinstance(spec, Omission):
        spec = spec.key
    if spec is None or not _has_sublayer_syntax(spec):
        return Omission(validate_omission(spec, total))
    items = [_parse_item(i) for i in (spec.split(",") if isinstance(spec, str) else spec)
             if not (isinstance(i, str) and not i.strip())]
    blocks = [i for i in items if isinstance(i, int)]
    sublayers = [i for i in items if isinstance(i, tuple)]
    _check_range(blocks + [b for b, _ in sublayers], total)
    repeated = sorted({f"{b}.{n}" for b, n in sublayers if sublayers.count((b, n)) > 1})
    if repeated or len(set(blocks)) < len(blocks):
        raise ConfigError(f"omission set lists {repeated or sorted({b for b in blocks if blocks.count(b) > 1})} "
                          "more than once")
    both = sorted({b for b, _ in sublayers} & set(blocks))
    if both:
        raise ConfigError(f"omission set names block {both[0]} whole and one of its sub-layers; list either "
                          f"'{both[0]}' or '{both[0]}.attn' / '{both[0]}.mlp'")
    whole = {b for b, _ in sublayers if all((b, n) in sublayers for n in SUBLAYERS)}
    return Omission(validate_omission(sorted({*blocks, *whole}), total),
                    tuple(sorted((b, n) for b, n in sublayers if b not in whole)))


def omission_key(spec, total: int | None) -> tuple[int | str, ...]:
    """:func:`parse_omission`'s canonical key: the sorted tuple of ints for a whole-block set (exactly what
    :func:`validate_omission` returns), with ``"12.attn"``-style strings when sub-layers are named."""
    return parse_omission(spec, total).key


def require_whole_blocks(spec, total: int | None, what: str) -> OmissionSet:
    """The whole-block set ``spec``; a one-line ConfigError saying ``what`` cannot take sub-layers if it names any."""
    omission = parse_omission(spec, total)
    if omission.sublayers:
        named = ",".join(f"{b}.{n}" for b, n in omission.sublayers)
        raise ConfigError(f"{what} takes whole blocks only, not sub-layers ({named}): a standard checkpoint has no "
                          "way to drop one sub-layer of a block; evaluate sub-layer sets with `pudding eval --omit`")
    return omission.blocks


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
# block -> (its direct children when last walked, the modules under it that carry an int layer_idx)
_LAYER_INDEXED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_indexed_modules(block: nn.Module) -> list[nn.Module]:
    """The modules of ``block`` that carry an int ``layer_idx`` (its KV-cache slot), cached per block.

    Walking every submodule of every kept block on each omission cost about 1 ms a call on an 8B model, a
    twentieth of its pre-fill of one prompt on a GPU. The cache is checked against the block's direct
    children, where the attention lives, so a swapped attention (a sub-layer omission, user code) is found.
    """
    children = tuple(block.children())
    cached = _LAYER_INDEXED.get(block)
    if cached is not None and len(cached[0]) == len(children) and all(a is b for a, b in zip(cached[0], children)):
        return cached[1]
    found = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    _LAYER_INDEXED[block] = (children, found)
    return found


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
    kept_blocks = [block for i, block in enumerate(blocks) if i not in omission]
    for new_index, block in enumerate(kept_blocks):
        for module in _layer_indexed_modules(block):
            saved.layer_idx.append((module, module.layer_idx))
            module.layer_idx = new_index
    config.num_hidden_layers = len(kept)
    setattr(owner, leaf, nn.ModuleList(kept_blocks))
    return saved


def _restore(model: nn.Module, saved: _SavedState) -> None:
    setattr(saved.owner, saved.leaf, saved.blocks)
    for module, index in saved.layer_idx:
        module.layer_idx = index
    for name, value in saved.config_fields.items():
        setattr(model.config, name, value)


class _SkippedAttention(nn.Module):
    """Stands in for a skipped self-attention: adds nothing to the residual stream and keeps no KV cache.

    Its ``layer_idx`` is the replaced module's, as a plain int, so whole-block omission renumbers it together
    with the rest of the block and it marks the right cache layer.
    """

    def __init__(self, layer_idx: int | None):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, *args, **kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        for value in (*args[1:], *kwargs.values()):
            if _is_cache(value):
                _drop_cache_layer(value, self.layer_idx)
        # Every supported family unpacks its attention's result as (output, attention weights).
        return torch.zeros_like(hidden_states), None


class _ZeroOutput(nn.Module):
    """Stands in for a skipped MLP module: zeros of width ``width``, or of the input's width when None."""

    def __init__(self, width: int | None):
        super().__init__()
        self.width = width

    def forward(self, hidden_states, *args, **kwargs):
        width = hidden_states.shape[-1] if self.width is None else self.width
        return hidden_states.new_zeros(*hidden_states.shape[:-1], width)


def _is_cache(value) -> bool:
    from transformers.cache_utils import Cache, EncoderDecoderCache

    return isinstance(value, (Cache, EncoderDecoderCache))


def _drop_cache_layer(cache, layer_idx: int | None) -> None:
    """Make cache layer ``layer_idx`` a ``DummyLayer``: it stores nothing, and transformers' length and mask
    lookups (``get_seq_length``, the first full or sliding layer for masks) pass over it. Without this, a skipped
    attention in the layer those lookups consult (layer 0, say) would report an empty cache while generating."""
    from transformers.cache_utils import DummyLayer, EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    if layer_idx is None:
        raise ConfigError("this attention module has no layer_idx, so its KV cache layer cannot be skipped")
    layers = cache.layers
    if cache.layer_class_to_replicate is not None:  # a cache built lazily, without the config
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    layer = layers[layer_idx]
    if isinstance(layer, DummyLayer):
        return
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ConfigError(f"KV cache layer {layer_idx} already holds states from a run with that attention kept; "
                          "a cache belongs to one omission set, start generation with a fresh cache")
    layers[layer_idx] = DummyLayer()


def _sublayer_swaps(blocks: nn.ModuleList, arch: Architecture, sublayers: tuple[SubLayer, ...]) -> list:
    """Every (owner, attribute, original, replacement) that skipping ``sublayers`` needs, resolved before
    anything is changed, so an unresolvable path fails with the model untouched."""
    swaps = []
    for block, name in sublayers:
        paths = (arch.attention_path,) if name == "attn" else arch.mlp_paths
        for position, path in enumerate(paths):
            try:
                owner, leaf = _resolve_parent(blocks[block], path)
                original = getattr(owner, leaf)
            except AttributeError:
                raise ConfigError(f"{arch.model_type}: block {block} has no {path!r} module, so {block}.{name} "
                                  "cannot be skipped") from None
            if name == "attn":
                replacement = _SkippedAttention(getattr(original, "layer_idx", None))
            elif position < len(paths) - 1:
                replacement = _ZeroOutput(0)  # an inline MLP's inner projection: nothing left to compute
            else:
                replacement = _ZeroOutput(getattr(original, "out_features", None))
            swaps.append((owner, leaf, original, replacement))
    return swaps


def _swap(swaps: list, *, restore: bool = False) -> None:
    for owner, leaf, original, replacement in reversed(swaps) if restore else swaps:
        setattr(owner, leaf, original if restore else replacement)


@contextmanager
def omit_blocks(model: nn.Module, blocks: Iterable[int | str] | str | Omission | None) -> Iterator[nn.Module]:
    """Run ``model`` with ``blocks`` omitted; restore it exactly on exit, even on an exception.

    Indices are 0-based positions in the full model. Inside the context the model is a valid smaller model:
    ``forward`` and ``generate`` (with or without KV cache) behave exactly as a model built with only the kept
    blocks. The model is edited in place, so do not use it from another thread meanwhile, and do not nest
    this context on the same model (pass the union of the blocks instead).

    The set may also name single sub-layers (``"3,12.attn,14.mlp"``, see :func:`parse_omission`): the block
    then runs without its attention (or MLP), whose residual contribution is zero, exactly as if that
    sub-layer's output projection were zero; a skipped attention writes no KV cache.

    Example::

        with omit_blocks(model, [20, 21]) as smaller:
            logits = smaller(input_ids).logits
        with omit_blocks(model, "20,12.attn"):
            logits = model(input_ids).logits
    """
    arch = get_architecture(model.config)
    omission = parse_omission(blocks, num_blocks(model))
    if model in _ACTIVE:
        raise ConfigError("omit_blocks is already active on this model; pass the union of the blocks instead")
    if not omission.blocks and not omission.sublayers:
        yield model
        return
    if omission.sublayers and arch.sublayer_check is not None:
        arch.sublayer_check(model.config)
    # Sub-layers first, by their indices in the full block list; the block re-listing then renumbers the
    # replacement attentions' layer_idx with the rest of each kept block, and _restore undoes that first.
    swaps, saved = _sublayer_swaps(get_blocks(model), arch, omission.sublayers), None
    try:
        _swap(swaps)
        saved = _apply_omission(model, arch, omission.blocks) if omission.blocks else None
        _ACTIVE.add(model)
        yield model
    finally:
        _ACTIVE.discard(model)
        if saved is not None:
            _restore(model, saved)
        _swap(swaps, restore=True)


def prune_blocks(model: nn.Module, blocks: Iterable[int] | str, *, inplace: bool = False) -> nn.Module:
    """Return a model permanently without ``blocks``.

    With ``inplace=False`` (default) ``model`` is left untouched and the result is a new model that shares
    nothing with it; only the kept blocks are copied, so peak memory is the original plus the kept part.
    With ``inplace=True`` ``model`` itself is shrunk and returned, and the omitted blocks are freed once no
    one else refers to them.
    """
    arch = get_architecture(model.config)
    omission = require_whole_blocks(blocks, num_blocks(model), "prune_blocks")
    if inplace:
        _apply_omission(model, arch, omission)
        return model
    with omit_blocks(model, omission):
        return copy.deepcopy(model)


def removable_blocks(total: int, barriers: tuple[int, int]) -> list[int]:
    """Blocks the search may remove: all but the first ``barriers[0]`` and the last ``barriers[1]``."""
    first, last = barriers
    if first < 0 or last < 0:
        raise ConfigError(f"barriers must be non-negative, got {barriers}")
    return list(range(first, total - last))


def check_k(k: int, total: int, barriers: tuple[int, int]) -> None:
    """ConfigError unless 1 <= k < number of removable blocks."""
    removable = len(removable_blocks(total, barriers))
    if not 1 <= k < removable:
        raise ConfigError(f"k={k} must be at least 1 and below the {removable} removable blocks "
                          f"({total} blocks, barriers {barriers[0]} first / {barriers[1]} last)")
