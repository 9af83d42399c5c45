"""SmoothQuant-style outlier migration (Xiao et al., 2023) for the int8 blocks: ``--quantize int8-smooth``.

Small LLMs carry a few input channels whose activations are tens to hundreds of times larger than the rest.
With per-token int8 activations those channels set each token's step, and every other channel of the token
loses precision. SmoothQuant moves that range into the weights: per input channel ``j`` of a linear layer,

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)        (alpha = 0.5)

and the layer computes ``(X / s) (W * s)^T``, the same product. ``max|X_j|`` comes from a few *calibration*
prompts (the tasks' calibration split, never evaluation documents), captured with forward pre-hooks.

Where ``1 / s`` goes:

- **Folded into the norm** that feeds the layer (q/k/v after ``input_layernorm``, gate/up after the MLP's
  norm, per family in :data:`NORM_FOLDS`): the norm's weight (and bias) are divided by ``s``, so it costs
  nothing at run time. Layers that read the same norm share one ``s`` (over the largest of their columns).
- **An explicit elementwise multiply** before every other quantized layer (``o_proj`` and ``down_proj``,
  and every layer of a family without a fold map): :class:`InputScaledLinear` holds ``1 / s`` and the int8
  layer multiplies its input by it before the per-token scaling. ``down_proj`` is where the largest outliers
  of small LLMs live, so leaving it unsmoothed would leave the worst layer as it was. The other exact
  placement, folding into ``v_proj``'s rows for ``o_proj`` and ``up_proj``'s rows for ``down_proj``, needs
  the attention's head grouping (GQA shares one value head between several query heads) and the MLP's
  gating known per family; one multiply of the layer's input, next to the per-token normalization the int8
  layer already does, is exact for every family without that knowledge.

Smoothing alone changes no output beyond fp32 rounding (``smooth_model`` checks that on a calibration
prompt and refuses otherwise); only the quantization that follows rounds differently. Layers kept in fp32
(``skip``) are not smoothed, except as members of a fold group whose norm they share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pudding.core.errors import ConfigError
from pudding.core.omit import get_blocks

SMOOTH_ALPHA = 0.5  # the paper's default migration strength
CALIBRATION_DOCS_PER_TASK = 8  # 48 prompts over the six paper tasks: a few seconds of fp32 forward passes
CALIBRATION_MAX_TOKENS = 256
EXACTNESS_TOLERANCE = 1e-4  # relative logit error smoothing may add (fp32 rounding is ~1e-6)


@dataclass(frozen=True)
class NormFold:
    """A norm inside a block and the linear layers that read its output (names inside the block)."""

    norm: str
    linears: tuple[str, ...]
    offset: float = 0.0  # gemma's norms scale by (1 + weight)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = (NormFold("input_layernorm", _QKV), NormFold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_GEMMA = (NormFold("input_layernorm", _QKV, 1.0),
          NormFold("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), 1.0))

# Where the blocks' norms feed linear layers directly, per config.model_type. A family without an entry gets the
# explicit multiply before every layer, which is exact whatever the block does.
NORM_FOLDS: dict[str, tuple[NormFold, ...]] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA,
    "gemma2": _GEMMA, "gemma3_text": _GEMMA,
    "phi3": (NormFold("input_layernorm", ("self_attn.qkv_proj",)),
             NormFold("post_attention_layernorm", ("mlp.gate_up_proj",))),
    "gpt2": (NormFold("ln_1", ("attn.c_attn",)), NormFold("ln_2", ("mlp.c_fc",))),
    "gpt_neox": (NormFold("input_layernorm", ("attention.query_key_value",)),
                 NormFold("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    # only with do_layer_norm_before (every OPT but 350m): see _folds
    "opt": (NormFold("self_attn_layer_norm", _QKV), NormFold("final_layer_norm", ("fc1",))),
}


class InputScaledLinear(nn.Linear):
    """``linear(x * input_scale)``: a smoothed layer whose ``1 / s`` no norm could absorb.

    An ``nn.Linear`` (GPT-2's Conv1D is converted), so it keeps its name and role for ``--quantize-skip``, and
    :class:`pudding.core.quantize.PerTokenInt8Linear` takes ``input_scale`` over into its own forward.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, input_scale: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                         dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("input_scale", input_scale.to(weight.dtype), persistent=False)
        self.smoothed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def matches(name: str, suffixes: Sequence[str]) -> bool:
    """Whether the layer ``name`` (inside a block, e.g. ``mlp.down_proj``) ends with one of ``suffixes``."""
    return any(name == s or name.endswith("." + s) for s in suffixes)


def calibration_texts(docs_per_task: int = CALIBRATION_DOCS_PER_TASK) -> list[str]:
    """Each paper task's first calibration documents, context and gold answer: never an evaluation document."""
    from pudding.core.tasks import PAPER_TASKS, load_docs

    return [d.contexts[d.gold] + d.continuations[d.gold]
            for task in PAPER_TASKS for d in load_docs(task, "calibration", limit=docs_per_task)]


def input_maxima(model: nn.Module, tokenizer, texts: Sequence[str],
                 names: set[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per layer in ``names`` (``"<block>.<name in block>"``), max |x| per input channel over ``texts``; and the
    logits of the first text, the reference the exactness check compares against."""
    maxima: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(_module, args):
            seen = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in _block_linears(model)
               if name in names]
    reference = None
    try:
        with torch.no_grad():
            for text in texts:  # one at a time: no padding tokens in the statistics
                ids = _encode(tokenizer, text, model)
                logits = model(ids).logits
                reference = logits if reference is None else reference
    finally:
        for handle in handles:
            handle.remove()
    if reference is None:
        raise ConfigError("smoothing needs at least one calibration text")
    return maxima, reference


def _encode(tokenizer, text: str, model: nn.Module) -> torch.Tensor:
    # transformers maps GPT-2's n_positions to this name too
    positions = getattr(model.config, "max_position_embeddings", None) or CALIBRATION_MAX_TOKENS
    limit = min(CALIBRATION_MAX_TOKENS, positions)
    ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
    return ids.to(next(model.parameters()).device)


def _block_linears(model: nn.Module):
    for index, block in enumerate(get_blocks(model)):
        for name, module in block.named_modules():
            if is_linear(module):
                yield f"{index}.{name}", module


def _folds(model: nn.Module) -> tuple[NormFold, ...]:
    model_type = getattr(model.config, "model_type", None)
    if model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return ()  # OPT-350m normalizes after each sub-layer: no norm feeds a linear layer
    return NORM_FOLDS.get(model_type, ())


def _plan(model: nn.Module, skip: Sequence[str]) -> list[tuple[nn.Module | None, list[str], float]]:
    """Groups to smooth: (norm or None for the explicit multiply, full layer names, norm offset)."""
    groups, folded = [], set()
    for index, block in enumerate(get_blocks(model)):
        modules = dict(block.named_modules())
        for fold in _folds(model):
            present = [n for n in fold.linears if n in modules]
            if fold.norm in modules and present and any(not matches(n, skip) for n in present):
                groups.append((modules[fold.norm], [f"{index}.{n}" for n in present], fold.offset))
                folded.update(f"{index}.{n}" for n in present)
    groups += [(None, [name], 0.0) for name, _ in _block_linears(model)
               if name not in folded and not matches(name.split(".", 1)[1], skip)]
    return groups


def smooth_model(model: nn.Module, tokenizer, texts: Sequence[str] | None = None, *, alpha: float = SMOOTH_ALPHA,
                 skip: Sequence[str] = ()) -> nn.Module:
    """Migrate activation outliers into the weights of the blocks' linear layers, in place; returns ``model``.

    ``texts`` default to :func:`calibration_texts`. The fp32 model's outputs stay the same up to rounding;
    a ConfigError is raised if they do not (a wrong fold map), before the caller quantizes anything.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    plan = _plan(model, skip)
    texts = calibration_texts() if texts is None else list(texts)
    maxima, reference = input_maxima(model, tokenizer, texts, {n for _, names, _ in plan for n in names})
    linears = dict(_block_linears(model))
    for norm, names, offset in plan:
        layers = [linears[n] for n in names]
        weight_max = torch.stack([_weight(m).abs().amax(dim=0) for m in layers]).amax(dim=0)
        act_max = maxima.get(names[0], torch.zeros_like(weight_max))
        scale = (act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        _scale_columns(layers, scale)
        if norm is not None:
            _fold_into_norm(norm, scale, offset)
        else:
            _set_input_scale(model, names[0], linears[names[0]], 1.0 / scale)
    _check_exact(model, tokenizer, texts[0], reference)
    return model


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features): transformers' Conv1D stores it transposed."""
    return module.weight.detach().float() if isinstance(module, nn.Linear) else module.weight.detach().float().t()


def _scale_columns(layers: list[nn.Module], scale: torch.Tensor) -> None:
    with torch.no_grad():
        for module in layers:
            factor = scale.to(module.weight.dtype)
            module.weight.mul_(factor[None, :] if isinstance(module, nn.Linear) else factor[:, None])
            module.smoothed = True


def _fold_into_norm(norm: nn.Module, scale: torch.Tensor, offset: float) -> None:
    with torch.no_grad():
        weight = norm.weight
        weight.copy_(((offset + weight.float()) / scale - offset).to(weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(scale.to(norm.bias.dtype))


def _set_input_scale(model: nn.Module, full_name: str, module: nn.Module, inverse: torch.Tensor) -> None:
    weight = _weight(module).to(module.weight.dtype)
    bias = None if module.bias is None else module.bias.detach()
    replacement = InputScaledLinear(weight, bias, inverse)
    index, name = full_name.split(".", 1)
    owner_name, _, attribute = name.rpartition(".")
    block = get_blocks(model)[int(index)]
    setattr(block.get_submodule(owner_name) if owner_name else block, attribute, replacement)


def _check_exact(model: nn.Module, tokenizer, text: str, reference: torch.Tensor) -> None:
    with torch.no_grad():
        logits = model(_encode(tokenizer, text, model)).logits
    error = float((logits - reference).norm() / reference.norm().clamp(min=1e-12))
    if not error <= EXACTNESS_TOLERANCE:
        raise ConfigError(f"smoothing changed {type(model).__name__}'s fp32 output (relative error {error:.2e}); "
                          "its norm-fold map in pudding.core.smooth.NORM_FOLDS does not match the architecture")
