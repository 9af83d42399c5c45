"""Compressed models that are not plain omissions: what LaCo and LLM-Streamline share.

Both baselines end with a model of ``n - k`` blocks whose weights differ from the original's (LaCo merges
blocks, LLM-Streamline trains a replacement block), so unlike SLEB or ShortGPT they cannot be an omission
set: each is saved as its own standard Hugging Face checkpoint (safetensors + config, loadable by vanilla
``AutoModelForCausalLM``), with ``compress.json`` beside the weights recording the method, k, calibration
documents, config, git commit and date. ``pudding eval --model <folder>`` then scores it like any model.

This module holds the shared parts: the calibration text (the same BoolQ passages as SLEB and the other
static baselines, :data:`pudding.pruning.search.OBJECTIVES` ``ppl``), capturing hidden states at block boundaries,
and the atomic checkpoint writer. :data:`COMPRESSORS` maps a method name to its stage module, which
``pudding compress --method`` dispatches on.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.omit import get_blocks
from pudding.core.provenance import atomic_folder, atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer, PackedBatch
from pudding.core.tasks import MCDoc

RECORD_FILE = "compress.json"
RECORD_FORMAT = "pudding.compress/1"
CALIBRATION_TASK = "boolq"  # the ppl objective's text: BoolQ passages, as SLEB / Shortened-LLaMA / ShortGPT use

# method -> (module, config class, entry function); imported lazily so `pudding --help` stays light.
COMPRESSORS: dict[str, tuple[str, str, str]] = {
    "laco": ("pudding.pruning.laco", "LacoConfig", "laco"),
    "streamline": ("pudding.pruning.streamline", "StreamlineConfig", "streamline"),
}

# Config-field metadata (help texts, flags: pudding.cli_config) of the settings every compressor's config has,
# declared once: `pudding compress` makes one flag of each, whatever the --method.
COMMON_FIELDS: dict[str, dict[str, Any]] = {
    "model": {"help": "'default', a .gguf file, a model folder or a hub id"},
    "k": {"type": "positive_int", "help": "blocks the result has fewer than the model"},
    "barriers": {"help": "blocks protected at the start and the end, e.g. 1,1"},
    "samples": {"type": "positive_int", "help": "calibration documents (BoolQ passages)"},
    "max_length": {"type": "positive_int", "help": "tokens kept per passage"},
    "max_batch_tokens": {"flag": "--batch-tokens", "type": "positive_int", "help": "padded tokens per forward pass"},
    "out": {"required": True, "help": "checkpoint folder (must be empty or absent)"},
}


def get_compressor(method: str) -> tuple[type, Callable]:
    """``(config class, entry function)`` of ``method``; UnknownNameError listing the known methods."""
    if method not in COMPRESSORS:
        raise UnknownNameError(f"unknown compression method {method!r}; known: {', '.join(COMPRESSORS)}")
    module, config_class, entry = COMPRESSORS[method]
    loaded = importlib.import_module(module)
    return getattr(loaded, config_class), getattr(loaded, entry)


def check_common(k: int | None, samples: int, max_length: int, max_batch_tokens: int,
                 barriers: Sequence[int] | str) -> tuple[int, int]:
    """Validate the settings every compressor shares (no model needed); return ``barriers`` as a pair (given
    as a sequence or as the text ``"1,1"``)."""
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"k must be a positive integer, got {k!r}")
    for name, value in (("samples", samples), ("max_length", max_length), ("max_batch_tokens", max_batch_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    pair = tuple(barriers)
    if isinstance(barriers, str):  # "1,1", as the CLI passes it; text that is not two integers is refused below
        try:
            pair = tuple(int(b) for b in barriers.split(","))
        except ValueError:
            pair = (barriers,)
    if len(pair) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in pair):
        raise ConfigError(f"barriers must be two non-negative integers like (1, 1), got {barriers!r}")
    return pair  # type: ignore[return-value]


# --- calibration text ------------------------------------------------------------------------------------


def calibration_text(samples: int, offset: int = 0) -> list[MCDoc]:
    """BoolQ calibration documents ``offset .. offset+samples`` (their passages are the text); ConfigError if short."""
    from pudding.pruning.candidates import calibration_docs

    return calibration_docs(CALIBRATION_TASK, offset + samples)[offset:]


def pack_text(model, tokenizer, docs: Sequence[MCDoc], max_length: int, max_batch_tokens: int) -> list[PackedBatch]:
    """The passages of ``docs`` tokenised and padded exactly as the SLEB / ``ppl`` search packs them."""
    from pudding.pruning.search import get_objective

    scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=max_batch_tokens, max_length=max_length)
    return scorer.pack(get_objective("ppl").requests(docs))


# --- hidden states at block boundaries ------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a hook once everything needed is captured: the rest of the forward pass is waste."""


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def block_output(output) -> torch.Tensor:
    """A decoder block's hidden-state output (blocks return a tensor or a tuple led by it)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def _stopped_by_hooks(handles: list) -> Iterator[None]:
    """Around a forward pass that ``handles``' hooks may end early with :class:`_Stop`: the pass stops there
    quietly, and the hooks are removed however it ends."""
    try:
        yield
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()


def _forward(model, batch: PackedBatch, **extra):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, **extra)


def block_states(model, batch: PackedBatch, inputs: Sequence[int] = (), outputs: Sequence[int] = ()
                 ) -> dict[tuple[str, int], torch.Tensor]:
    """Hidden states entering blocks ``inputs`` and leaving blocks ``outputs``, from one pass that stops early.

    Returns ``{("in", b): tensor, ("out", b): tensor}``, each (rows, width, hidden).
    """
    blocks, states = get_blocks(model), {}
    wanted = {("in", b) for b in inputs} | {("out", b) for b in outputs}

    def keep(key, value):
        states[key] = value.detach()
        if len(states) == len(wanted):
            raise _Stop

    handles = [blocks[b].register_forward_pre_hook(
        lambda m, args, kwargs, b=b: keep(("in", b), _hidden_arg(args, kwargs)), with_kwargs=True) for b in inputs]
    handles += [blocks[b].register_forward_hook(
        lambda m, args, output, b=b: keep(("out", b), block_output(output))) for b in outputs]
    with _stopped_by_hooks(handles):
        if wanted:
            with torch.inference_mode():
                _forward(model, batch)
    return states


def run_one_block(model, index: int, batch: PackedBatch, hidden_in: torch.Tensor) -> torch.Tensor:
    """Block ``index`` of ``model`` applied to ``hidden_in`` with ``batch``'s mask and positions.

    The model's own forward builds the mask and the rotary embeddings, and the block is called with them; a
    pre-hook swaps the block's input for ``hidden_in`` and a hook stops the pass at its output. So this works
    for every registered family without calling a decoder layer by hand, and gradients flow into the block
    (call it under ``torch.enable_grad``). Every other block is omitted meanwhile, so none of them runs.
    """
    from pudding.core.omit import omit_blocks

    captured: list[torch.Tensor] = []

    def stop(module, args, output):
        captured.append(block_output(output))
        raise _Stop

    others = [b for b in range(len(get_blocks(model))) if b != index]
    with omit_blocks(model, others):
        block = get_blocks(model)[0]
        handles = [block.register_forward_pre_hook(lambda m, args, kwargs: _with_hidden(args, kwargs, hidden_in),
                                                    with_kwargs=True),
                   block.register_forward_hook(stop)]
        with _stopped_by_hooks(handles):
            _forward(model, batch)
    return captured[0]


def final_hidden(model, batch: PackedBatch) -> torch.Tensor:
    """The model's last hidden state (after its final norm), (rows, width, hidden), without the LM head."""
    with torch.inference_mode():
        return _forward(model, batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens (``mask`` (rows, width) is 1 there) and every hidden unit."""
    weight = mask.to(pred.dtype).unsqueeze(-1)
    return ((pred - target) ** 2 * weight).sum() / (weight.sum() * pred.shape[-1])


# --- the checkpoint ---------------------------------------------------------------------------------------


def base_model_record(spec: str, config) -> dict[str, Any]:
    from pudding.core.load import model_fingerprint, model_name

    return {"spec": spec, "name": model_name(spec), "fingerprint": model_fingerprint(config)}


def save_compressed(model, tokenizer, out: str | Path, record: dict[str, Any],
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` as a standard HF checkpoint in ``out``, with ``record`` as ``compress.json`` beside it.

    Everything goes into a temporary sibling folder that is renamed to ``out`` only once complete (a crash
    never leaves half a checkpoint). ``extra(folder)`` may add files (training curves) before the rename. The
    config also carries a short summary under ``pudding_compress``, so the checkpoint says what it is.
    """
    from pudding.pruning.export import _plain_checkpoint

    record = {"format": RECORD_FORMAT, **record, "provenance": provenance()}
    summary = {key: record[key] for key in ("method", "k", "original_num_blocks", "blocks") if key in record}
    model.config.pudding_compress = summary
    try:
        with atomic_folder(out) as tmp, _plain_checkpoint(model):
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / RECORD_FILE, record)
            if extra is not None:
                extra(tmp)
    finally:
        del model.config.pudding_compress
    return Path(out)


def check_out(out: str | Path | None) -> None:
    """ConfigError unless ``out`` is absent or an empty folder (checked before any model loads)."""
    if out is None:
        return
    from pudding.pruning.export import _output_folder

    _output_folder(out)


def prepare(config, model, tokenizer, check_blocks: Callable[[int], Any]) -> tuple[Any, Any, int, list[MCDoc]]:
    """The start every compression method shares: check ``config.out`` and the model's block count (with
    ``check_blocks(total)``) before anything loads, then the calibration passages, then the model unless one
    was passed. Returns ``(model, tokenizer, total blocks, calibration docs)``."""
    from pudding.core.load import load_config, load_model

    check_out(config.out)
    total = (model.config if model is not None else load_config(config.model)).num_hidden_layers
    check_blocks(total)  # fail before loading the model or the data
    docs = calibration_text(config.samples)
    if model is None:
        model, tokenizer = load_model(config.model)
    return model, tokenizer, total, docs
