"""Export: statically pruned models as standard Hugging Face checkpoints.

``export_pruned`` removes a set of blocks for good (:func:`pudding.core.omit.prune_blocks`) and saves the result
with ``save_pretrained``: safetensors weights, blocks renumbered 0..n-1, and a config whose layer count (and
per-layer fields such as ``layer_types``) match. Vanilla ``AutoModelForCausalLM.from_pretrained`` loads it,
so any engine that reads HF checkpoints (vLLM, TGI, llama.cpp's converter) can serve it. The config also
records what was removed, under ``pudding_export``.

``export_all_sets`` does this for every set of a PuDDing artifact and writes ``manifest.json``, the map
from set to checkpoint that ``pudding serve --gateway`` deployments are built from.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from pudding.core.errors import ConfigError
from pudding.core.load import load_model, model_name
from pudding.core.omit import OmissionSet, num_blocks, omit_blocks, require_whole_blocks
from pudding.core.provenance import atomic_folder, atomic_write_json, exclusive_output, provenance, read_json

MANIFEST_FILE = "manifest.json"


def _output_folder(out: str | Path, resumable: bool = False) -> Path:
    """``out`` as a real path (a symlink to a folder means that folder); refuse a file, and refuse a folder
    that already holds files unless the export is ``resumable`` (it checks what it finds there itself)."""
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; choose another --out")
    if not resumable and out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out or remove it")
    return out


@contextmanager
def _plain_checkpoint(model) -> Iterator[None]:
    """Let ``save_pretrained`` write a model that transformers loaded from GGUF and de-quantized.

    transformers keeps a GGUF quantizer on such a model and refuses to serialize it, although every weight
    is already a plain float tensor. Those tensors *are* the checkpoint, so the quantizer (and the config's
    ``quantization_config``, which would make a reader expect GGUF blocks) are set aside while saving. A
    model whose weights are still packed (GGUF kernels, bitsandbytes, ...) is left alone: transformers
    decides whether that can be saved.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(getattr(config, "quant_method", None), "value", None)
    if method != "gguf" or not _all_plain(model):
        yield
        return
    saved_config = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if saved_config is not None:
            model.config.quantization_config = saved_config


def _all_plain(model) -> bool:
    """True if every weight is an ordinary float tensor, i.e. nothing is left in a packed quantized format."""
    tensors = [*model.parameters(), *model.buffers()]
    return all(type(t.data) is torch.Tensor and t.dtype.is_floating_point for t in tensors)


def _save(model, tokenizer, out: Path) -> None:
    """save_pretrained into a unique sibling temp folder, then rename: a crash never leaves half a checkpoint."""
    with atomic_folder(out) as tmp, _plain_checkpoint(model):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def export_pruned(model, tokenizer, blocks, out: str | Path, *, source: str | None = None) -> Path:
    """Save ``model`` without ``blocks`` as a standard HF checkpoint in ``out``; ``model`` is left intact."""
    out = _output_folder(out)
    with exclusive_output(out):
        return _export_pruned(model, tokenizer, blocks, out, source)


def _export_pruned(model, tokenizer, blocks, out: Path, source: str | None, adapter: str | None = None) -> Path:
    omission = require_whole_blocks(blocks, num_blocks(model), "export")
    with omit_blocks(model, omission):
        # Inside the context the model *is* the pruned model (renumbered, config updated), so saving it
        # writes exactly the pruned checkpoint without copying any weights.
        model.config.pudding_export = {"omitted_blocks": list(omission), "source": source,
                                       "original_num_blocks": num_blocks(model) + len(omission),
                                       **({"adapter": adapter} if adapter else {})}
        try:
            _save(model, tokenizer, out)
        finally:
            del model.config.pudding_export
    return out


def _exported_blocks(folder: Path) -> list[int] | None:
    """The blocks a finished export in ``folder`` omitted, or None if it holds none (or not one of ours)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    record = read_json(config, f"{config} is missing").get("pudding_export")
    return record.get("omitted_blocks") if isinstance(record, dict) else None


def export_all_sets(pudding, out: str | Path) -> Path:
    """Export every set of a PuddingModel to ``out/set-<i>/`` and write ``out/manifest.json``.

    Resumable: a finished ``set-<i>`` is kept, but only after checking that it holds that very set, so
    a folder left by another artifact's export is refused instead of served under the wrong name.
    """
    out = _output_folder(out, resumable=True)
    with exclusive_output(out):
        out.mkdir(parents=True, exist_ok=True)
        entries = [_export_set(pudding, out, index, entry) for index, entry in enumerate(pudding.pool.sets)]
        atomic_write_json(out / MANIFEST_FILE, {
            "format": "pudding.export-manifest/1", "base_model": pudding.pool.model, "sets": entries,
            "gateway_backends": [f"{e['index']}=http://HOST:PORT" for e in entries], "provenance": provenance()})
    return out


def _export_set(pudding, out: Path, index: int, entry) -> dict:
    require_whole_blocks(entry.blocks, None, f"pudding export (set {index}, {entry.name})")
    folder = out / f"set-{index}"
    finished = _exported_blocks(folder)
    if finished is None:  # the caller holds the lock on ``out``, which covers its set folders
        model, adapter = pudding.model, None
        if pudding.adapters is not None:  # a plain copy, this set's LoRA merged in: it loads with no PEFT
            model, adapter = pudding.adapters.plain_copy(entry.blocks)
        _export_pruned(model, pudding.tokenizer, entry.blocks, _output_folder(folder),
                       pudding.pool.model.get("name"), adapter)
    elif finished != list(entry.blocks):
        raise ConfigError(f"{folder} holds a model without blocks {finished}, but set {index} ({entry.name}) "
                          f"omits {list(entry.blocks)}; remove it or choose another --out")
    return {"index": index, "name": entry.name, "blocks": list(entry.blocks), "path": folder.name}


def export_from_spec(spec: str, blocks: str, out: str | Path) -> tuple[Path, OmissionSet]:
    """Load ``spec`` and export it without ``blocks`` (the ``pudding export --omit`` path)."""
    _output_folder(out)  # before the model loads: a non-empty --out fails in a second, not after minutes
    require_whole_blocks(blocks, None, "pudding export")  # likewise for a sub-layer set
    model, tokenizer = load_model(spec)
    omission = require_whole_blocks(blocks, num_blocks(model), "pudding export")
    return export_pruned(model, tokenizer, omission, out, source=model_name(spec)), omission
