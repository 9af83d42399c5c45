"""Export: statically pruned models as standard Hugging Face checkpoints.

``export_pruned`` removes a set of blocks for good (:func:`pudding.omit.prune_blocks`) and saves the result
with ``save_pretrained``: safetensors weights, blocks renumbered 0..n-1, and a config whose layer count (and
per-layer fields such as ``layer_types``) match. Vanilla ``AutoModelForCausalLM.from_pretrained`` loads it,
so any engine that reads HF checkpoints (vLLM, TGI, llama.cpp's converter) can serve it. The config also
records what was removed, under ``pudding_export``.

``export_all_sets`` does this for every set of a PuDDing artifact and writes ``manifest.json``, the map
from set to checkpoint that ``pudding serve --gateway`` deployments are built from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pudding.errors import ConfigError
from pudding.load import load_model, model_name
from pudding.omit import OmissionSet, num_blocks, omit_blocks, validate_omission
from pudding.provenance import atomic_write_json, provenance

MANIFEST_FILE = "manifest.json"


def _save_atomically(model, tokenizer, out: Path) -> None:
    """save_pretrained into a sibling temp folder, then rename: a crash never leaves half a checkpoint."""
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose another --out or remove it")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_pruned(model, tokenizer, blocks, out: str | Path, *, source: str | None = None) -> Path:
    """Save ``model`` without ``blocks`` as a standard HF checkpoint in ``out``; ``model`` is left intact."""
    omission = validate_omission(blocks, num_blocks(model))
    out = Path(out)
    with omit_blocks(model, omission):
        # Inside the context the model *is* the pruned model (renumbered, config updated), so saving it
        # writes exactly the pruned checkpoint without copying any weights.
        model.config.pudding_export = {"omitted_blocks": list(omission), "source": source,
                                       "original_num_blocks": num_blocks(model) + len(omission)}
        try:
            _save_atomically(model, tokenizer, out)
        finally:
            del model.config.pudding_export
    return out


def export_all_sets(pudding, out: str | Path) -> Path:
    """Export every set of a PuddingModel to ``out/set-<i>/`` and write ``out/manifest.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, entry in enumerate(pudding.pool.sets):
        folder = out / f"set-{index}"
        if not (folder / "config.json").exists():  # resumable: finished sets are kept
            export_pruned(pudding.model, pudding.tokenizer, entry.blocks, folder, source=pudding.pool.model.get("name"))
        entries.append({"index": index, "name": entry.name, "blocks": list(entry.blocks), "path": folder.name})
    atomic_write_json(out / MANIFEST_FILE, {
        "format": "pudding.export-manifest/1", "base_model": pudding.pool.model, "sets": entries,
        "gateway_backends": [f"{e['index']}=http://HOST:PORT" for e in entries], "provenance": provenance()})
    return out


def export_from_spec(spec: str, blocks: str, out: str | Path) -> tuple[Path, OmissionSet]:
    """Load ``spec`` and export it without ``blocks`` (the ``pudding export --omit`` path)."""
    model, tokenizer = load_model(spec)
    omission = validate_omission(blocks, num_blocks(model))
    return export_pruned(model, tokenizer, omission, out, source=model_name(spec)), omission
