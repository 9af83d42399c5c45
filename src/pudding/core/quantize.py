"""Quantize the linear layers inside the decoder blocks, so that depth pruning composes with it.

Block omission re-lists whole blocks (:mod:`pudding.core.omit`), so it does not care what a block's linear layers
are: a quantized model with blocks omitted is exactly the same quantized model rebuilt without them.

Methods (``QUANTIZATIONS``):

- ``none``: the model as loaded.
- ``int8``: int8 weights (symmetric, one scale per output channel) and int8 activations with one scale per
  *token*, through PyTorch's fbgemm kernel ``quantized::linear_dynamic``. That kernel only offers one scale per
  *tensor*, which small LLMs cannot take: a few huge activation channels set the scale for the whole batch,
  every other token loses its precision, and a document's score depends on its batchmates. So each token row
  is divided by its own absolute maximum before the call and multiplied back after it (a linear map commutes
  with a per-row scale), and one anchor row holding +1 and -1 pins the tensor's range to [-1, 1]. The grid
  is then per token and the same whatever else is in the batch. The fbgemm kernel is the fast int8 GEMM that
  runs on AVX2 CPUs; torchao's per-token path uses ``torch._int_mm``, which has no fast kernel on CPUs
  without VNNI and ran 16x slower than fp32 here (see ``benchmarks/bench_quantize.py``).
- ``int8-smooth``: ``int8`` after SmoothQuant's outlier migration (:mod:`pudding.core.smooth`), calibrated on
  the tasks' calibration prompts.
- ``int8-mm``, ``int8-mm-smooth``: the same two, with symmetric 8-bit activations (127 steps each side of zero,
  twice ``int8``'s 7-bit grid) through ``torch._int_mm`` (:class:`IntMMInt8Linear`). That kernel is fast on CPUs
  with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) and slow on plain AVX2, so which int8 path is faster depends on the
  machine; ``benchmarks/bench_quantize.py`` measures both where it runs.
- ``bf16``: the blocks' linear layers in bfloat16 with fp32 accumulation (:class:`Bf16Linear`), everything else
  fp32. A floating grid keeps each element's relative precision, so outlier channels cost nothing; fast on CPUs
  with AVX-512 BF16 or AMX, emulated (slower than fp32) elsewhere.

``skip`` (``--quantize-skip``) keeps the linear layers whose names end with the given suffixes (``down_proj``)
in fp32.

Left out, measured on a 2-core AVX2 machine without VNNI with torchao 0.18: its per-token int8 path
(``torch._int_mm``, 36x slower than an fp32 matmul of the same shape there; ``int8-mm`` is the same product
without torchao) and its int8 weight-only path (no faster than fp32 on
CPU, where the weights are de-quantized for each product); its int4 weight-only formats have no CPU layout.
GPU users quantize through transformers instead (bitsandbytes, AWQ, GPTQ, torchao configs); such a model
goes through block omission unchanged, since omission only re-lists the blocks.

The LM head and the embeddings stay fp32 unless ``head=True``: the head decides every log-likelihood, and
SmolLM2 ties it to the embedding matrix, so quantizing it keeps a second copy of that matrix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.omit import get_blocks
from pudding.core.smooth import SMOOTH_ALPHA, is_linear, matches, smooth_model


@dataclass(frozen=True)
class Quantization:
    """One ``--quantize`` method: what it does, and how it replaces one linear layer."""

    name: str
    description: str
    replace: Callable[[nn.Module], nn.Module] | None  # None: leave the model as it is
    smooth: float | None = None  # SmoothQuant's alpha, if the outliers are migrated first


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight as (out_features, in_features) and the bias, for nn.Linear and GPT-2's transposed Conv1D."""
    weight = module.weight.detach().float()
    if not isinstance(module, nn.Linear):  # transformers' Conv1D stores the weight as (in, out)
        weight = weight.t()
    bias = None if module.bias is None else module.bias.detach().float()
    return weight.contiguous(), bias


class _LowPrecisionLinear(nn.Module):
    """What every quantized layer keeps beside its low-precision matrix, and the fp32 work around its product.

    ``method`` is the ``--quantize`` method the class implements (without ``-smooth``); ``weight_bytes`` what its
    matrix and scales hold, since no parameter holds them.
    """

    method = ""

    def _adopt(self, module: nn.Module) -> torch.Tensor:
        """Take ``module``'s sizes, bias and SmoothQuant marks; return its weight as (out_features, in_features)."""
        weight, bias = _linear_weight(module)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("bias", bias, persistent=False)
        # SmoothQuant's 1/s where no norm absorbed it (pudding.core.smooth.InputScaledLinear)
        input_scale = getattr(module, "input_scale", None)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone(),
                             persistent=False)
        self.smoothed = bool(getattr(module, "smoothed", False))
        return weight

    @property
    def weight_bytes(self) -> int:
        raise NotImplementedError

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as fp32 token rows, SmoothQuant's input scale applied."""
        rows = x.reshape(-1, self.in_features).float()
        return rows if self.input_scale is None else rows * self.input_scale

    def _output(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The product's rows with the bias added, in ``x``'s shape and dtype."""
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


class _Int8Linear(_LowPrecisionLinear):
    """An int8 layer: int8 matrix, one fp32 scale per output channel."""

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features + 4 * self.out_features


class PerTokenInt8Linear(_Int8Linear):
    """A linear layer with int8 weights (per output channel) and int8 activations (per token), on fbgemm."""

    method = "int8"

    def __init__(self, module: nn.Module):
        super().__init__()
        weight = self._adopt(module)
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self._packed = torch.ops.quantized.linear_prepack(quantized, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
        anchor = rows.new_zeros(1, self.in_features)
        anchor[0, 0], anchor[0, -1] = 1.0, -1.0
        # reduce_range=True: fbgemm's AVX2 kernel sums pairs of uint8 x int8 products in int16, which 7-bit
        # activations keep from saturating.
        out = torch.ops.quantized.linear_dynamic(torch.cat([rows / scale, anchor]), self._packed, True)[:-1]
        return self._output(out * scale, x)

    def __deepcopy__(self, memo):
        # fbgemm's packed weight is a TorchScript object: share it (it is never modified) instead of copying.
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        nn.Module.__init__(copied)
        copied.in_features, copied.out_features = self.in_features, self.out_features
        copied._packed, copied.smoothed = self._packed, self.smoothed
        for name in ("bias", "input_scale"):
            value = getattr(self, name)
            copied.register_buffer(name, None if value is None else value.clone(), persistent=False)
        copied.train(self.training)
        return copied

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.smoothed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token{smoothed}"


class IntMMInt8Linear(_Int8Linear):
    """A linear layer with int8 weights (per output channel) and symmetric int8 activations (per token), through
    ``torch._int_mm``: the int8 GEMM torchao's per-token path uses.

    Its activation grid is twice as fine as :class:`PerTokenInt8Linear`'s: 127 steps each side of zero, where
    fbgemm's AVX2 kernel needs ``reduce_range`` (7-bit activations) to keep its int16 pair sums from saturating.
    ``torch._int_mm`` is fast only on CPUs with VNNI (AVX-512 VNNI, AVX-VNNI or AMX); without them it is many
    times slower than fp32 (``benchmarks/bench_quantize.py`` measures both on the machine it runs on).
    Accumulation is exact in int32: 127 * 127 * in_features stays below 2**31 for in_features < 133,000.
    """

    method = "int8-mm"

    def __init__(self, module: nn.Module):
        super().__init__()
        weight = self._adopt(module)
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", quantized.t().contiguous(), persistent=False)  # (in, out) for _int_mm
        self.register_buffer("weight_scale", scales, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
        quantized = torch.round(rows / scale).clamp(-127, 127).to(torch.int8)
        return self._output(torch._int_mm(quantized, self.weight_int8).float() * (scale * self.weight_scale), x)

    def extra_repr(self) -> str:
        smoothed = ", smoothed" if self.smoothed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token (_int_mm){smoothed}"


class Bf16Linear(_LowPrecisionLinear):
    """A linear layer computed in bfloat16: bf16 weights, each input rounded to bf16, the product accumulated in
    fp32 by oneDNN and rounded to bf16 once, then returned in fp32 with the fp32 bias added.

    Not an integer grid but a floating one: every element keeps 8 significant bits *relative to itself*, so an
    outlier channel costs its neighbours nothing, where a per-token int8 scale gives every element the same step
    as the token's largest. The residual stream, norms, attention's own products, the embeddings and the LM head
    stay fp32. Fast on CPUs with native bf16 dot products (AVX-512 BF16, AMX); elsewhere PyTorch emulates it
    (slower than fp32), and :func:`quantize_model` warns.
    """

    method = "bf16"

    def __init__(self, module: nn.Module):
        super().__init__()
        weight = self._adopt(module)
        self.register_buffer("weight_bf16", weight.to(torch.bfloat16), persistent=False)

    @property
    def weight_bytes(self) -> int:
        return 2 * self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x).to(torch.bfloat16)
        return self._output(nn.functional.linear(rows, self.weight_bf16).float(), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16"


QUANTIZATIONS: dict[str, Quantization] = {
    q.name: q for q in (
        Quantization("none", "the model as loaded", None),
        Quantization("int8", "int8 weights per channel, int8 activations per token (fbgemm)", PerTokenInt8Linear),
        Quantization("int8-smooth", "int8 after SmoothQuant outlier migration (alpha 0.5, calibration prompts)",
                     PerTokenInt8Linear, SMOOTH_ALPHA),
        Quantization("int8-mm", "int8 weights per channel, symmetric int8 activations per token (torch._int_mm; "
                                "fast with VNNI)", IntMMInt8Linear),
        Quantization("int8-mm-smooth", "int8-mm after SmoothQuant outlier migration", IntMMInt8Linear,
                     SMOOTH_ALPHA),
        Quantization("bf16", "bf16 weights and activations, fp32 accumulation (fast with AVX-512 BF16 or AMX)",
                     Bf16Linear),
    )
}


QUANTIZED_LINEARS = (_LowPrecisionLinear,)  # isinstance: every quantized layer


def get_quantization(name: str) -> Quantization:
    """The registry entry for ``name``; UnknownNameError listing the known methods."""
    if name not in QUANTIZATIONS:
        raise UnknownNameError(f"unknown quantization {name!r}; known: {', '.join(QUANTIZATIONS)}")
    return QUANTIZATIONS[name]


def _cpu_only(devices: set[str]) -> ConfigError:
    return ConfigError(f"--quantize runs on CPU only; the model is on {', '.join(sorted(devices))}. On GPU load "
                       "the model in bf16 (dtype=torch.bfloat16) or a quantized checkpoint through transformers "
                       "(bitsandbytes, AWQ, GPTQ) instead")


def _check_device(model: nn.Module, method: Quantization) -> None:
    devices = {p.device.type for p in model.parameters()}
    if method.replace is not None and devices != {"cpu"}:
        raise _cpu_only(devices)


def skip_names(skip: str | Sequence[str] | None) -> tuple[str, ...]:
    """``--quantize-skip`` as a tuple of layer-name suffixes: ``"down_proj,o_proj"`` or a sequence of names."""
    names = (skip or "").split(",") if isinstance(skip, str) or skip is None else list(skip)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"quantize_skip must be layer-name suffixes like down_proj, got {skip!r}")
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    bad = [n for n in names if not all(part.isidentifier() for part in n.split("."))]
    if bad:
        raise ConfigError(f"--quantize-skip takes layer-name suffixes like down_proj or mlp.down_proj, got {bad[0]!r}")
    return names


def check_quantization(method: str, head: bool = False, device: str | torch.device | None = None, *,
                       skip: str | Sequence[str] = ()) -> Quantization:
    """Validate a ``--quantize`` setting before any weight is read: the method, ``head`` and ``skip`` (which need
    a method) and, if given, the device the model will be on. One-line ConfigError (UnknownNameError) otherwise."""
    quantization = get_quantization(method)
    if not isinstance(head, bool):
        raise ConfigError(f"quantize_head must be true or false, got {head!r}")
    if head and quantization.replace is None:
        raise ConfigError("--quantize-head quantizes the LM head too, so it needs a --quantize method (e.g. int8)")
    if skip_names(skip) and quantization.replace is None:
        raise ConfigError("--quantize-skip keeps some quantized layers in fp32, so it needs a --quantize method "
                          "(e.g. int8)")
    if device is not None and quantization.replace is not None and torch.device(device).type != "cpu":
        raise _cpu_only({torch.device(device).type})
    return quantization


def quantize_identity(method: str, head: bool = False, skip: str | Sequence[str] = ()) -> dict:
    """What a quantization adds to a resumable stage's identity (search checkpoints, label shards, reuse).

    Empty for ``none``, so every identity written before quantization existed still matches an fp32 run;
    otherwise the method, ``quantize_head`` when the head is quantized too, and ``quantize_skip`` (sorted)
    when layers stay fp32: an ``int8`` identity without either is what it was before they existed.
    """
    if get_quantization(method).replace is None:
        return {}
    skip = sorted(skip_names(skip))
    return {"quantize": method, **({"quantize_head": True} if head else {}),
            **({"quantize_skip": skip} if skip else {})}


def quantization_of(model: nn.Module) -> tuple[str, bool]:
    """``(method, head)`` of a model as it is now: ``("int8", False)`` after ``quantize_model(m, "int8")``."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)]
    if not layers:
        return "none", False
    base = layers[0].method
    method = f"{base}-smooth" if any(m.smoothed for m in layers) else base
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return method, isinstance(head, QUANTIZED_LINEARS)


def kept_fp32(model: nn.Module) -> tuple[str, ...]:
    """The names (inside their block) of the blocks' linear layers a quantized model keeps in fp32, sorted."""
    if quantization_of(model)[0] == "none":
        return ()
    return tuple(sorted({name for block in get_blocks(model) for name, m in block.named_modules() if is_linear(m)}))


def check_quantized(model: nn.Module, method: str, head: bool = False, skip: str | Sequence[str] = ()) -> None:
    """ConfigError unless ``model`` (one a caller passed in, not loaded by the stage) is quantized as declared:
    a stage records its ``quantize`` setting next to its results, so the two must agree."""
    found, wanted = quantization_of(model), (method, head and method != "none")
    skip = skip_names(skip) if method != "none" else ()
    kept = kept_fp32(model)
    if found != wanted or (found[0] != "none" and kept != _matching(model, skip)):
        raise ConfigError(f"the model passed in is quantized as {_describe(*found, kept)}, but the configuration "
                          f"says {_describe(*wanted, skip)}; quantize it with pudding.core.quantize.quantize_model "
                          "first, or let the stage load the model")


def _matching(model: nn.Module, skip: Sequence[str]) -> tuple[str, ...]:
    names = {name for block in get_blocks(model) for name, m in block.named_modules()
             if is_linear(m) or isinstance(m, QUANTIZED_LINEARS)}
    return tuple(sorted(n for n in names if matches(n, skip)))


def _describe(method: str, head: bool, kept: Sequence[str] = ()) -> str:
    return method + (" with the LM head" if head else "") + (f" keeping {','.join(kept)} fp32" if kept else "")


def quantize_model(model: nn.Module, method: str, *, head: bool = False, skip: str | Sequence[str] = (),
                   tokenizer=None, calibration: Sequence[str] | None = None) -> nn.Module:
    """Replace every linear layer inside the decoder blocks (and the LM head if ``head``) in place.

    Returns ``model``. ``method="none"`` leaves it untouched. Layers whose names inside the block end with one
    of ``skip`` (``"down_proj"``) stay fp32. ``int8-smooth`` first runs :func:`pudding.core.smooth.smooth_model`
    on ``calibration`` texts (default: the tasks' calibration prompts), which needs the ``tokenizer``.
    Quantize *before* omitting blocks: omission only re-lists the blocks, so it is exact on the quantized model.
    """
    quantization = get_quantization(method)
    skip = skip_names(skip)
    if quantization.replace is None:
        if skip:
            check_quantization(method, skip=skip)
        return model
    _check_device(model, quantization)
    _check_skip(model, skip)
    if quantization.replace is Bf16Linear and not native_bf16():
        warnings.warn("--quantize bf16: this CPU has no native bf16 dot products (AVX-512 BF16 or AMX), so PyTorch "
                      "emulates them and bf16 runs slower than fp32; int8-smooth is the fast path here",
                      stacklevel=2)
    if quantization.smooth is not None:
        if tokenizer is None:
            raise ConfigError(f"--quantize {method} calibrates on prompts, so quantize_model needs the tokenizer")
        smooth_model(model, tokenizer, calibration, alpha=quantization.smooth, skip=skip)
    for block in get_blocks(model):
        _replace_linears(block, quantization.replace, skip)
    if head:
        _replace_head(model, quantization.replace)
    return model


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _check_skip(model: nn.Module, skip: Sequence[str]) -> None:
    names = {name for block in get_blocks(model) for name, m in block.named_modules() if is_linear(m)}
    unknown = [s for s in skip if not any(matches(n, (s,)) for n in names)]
    if unknown:
        raise ConfigError(f"--quantize-skip {unknown[0]!r} names no linear layer in the blocks; they have: "
                          f"{', '.join(sorted(names))}")


def _replace_linears(owner: nn.Module, replace: Callable[[nn.Module], nn.Module], skip: Sequence[str] = (),
                     prefix: str = "") -> None:
    for name, child in list(owner.named_children()):
        if is_linear(child):
            if not matches(prefix + name, skip):
                setattr(owner, name, replace(child))
        else:
            _replace_linears(child, replace, skip, f"{prefix}{name}.")


def _replace_head(model: nn.Module, replace: Callable[[nn.Module], nn.Module]) -> None:
    head = model.get_output_embeddings()
    if head is None or not is_linear(head):
        raise ConfigError(f"{type(model).__name__} has no linear LM head to quantize")
    # A tied head shares its weight with the input embedding; the quantized copy unties them, and the
    # embedding keeps the fp32 matrix. The config is left as loaded: it describes the network every artifact
    # is fingerprinted by (pudding.core.load.model_fingerprint), and only loading or resizing re-ties weights.
    model.set_output_embeddings(replace(head))


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's weights as they are now (quantized layers counted at their int8 or bf16 size)."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, QUANTIZED_LINEARS):  # bias and scales are fp32 buffers beside the int8 matrix
            total += module.weight_bytes + sum(_tensor_bytes(t) for t in (module.bias, module.input_scale)
                                               if t is not None)
            continue
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    inner = getattr(tensor, "__tensor_flatten__", None)
    if inner is not None:  # torchao tensor subclasses keep their int8 data and scales as inner tensors
        names, _ = inner()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()
