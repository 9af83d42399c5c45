"""Healing adapters on disk, and applying the right one to each omission set at inference.

``pudding heal`` (:mod:`pudding.healing.lora.lora`) writes PEFT adapters under an artifact's ``adapters/`` folder;
:class:`AdapterBank` loads them, checks they were trained for this base model and pool, and switches the
active adapter with the routed set. The routed model, the server, evaluation and export use it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.core.omit import OmissionSet
from pudding.core.provenance import read_json
from pudding.pool.artifact import CandidatePool

ADAPTERS_DIR = "adapters"
ADAPTER_FILE = "pudding_adapter.json"
TRAINING_FILE = "training.json"
TRAINING_PLOT = "training.png"
ADAPTER_FORMAT = "pudding.adapter/1"
SHARED = "shared"
MODES = ("per-set", "shared")
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")

def adapter_name(set_index: int | None) -> str:
    """The folder and PEFT adapter name: ``set-<i>`` for a per-set adapter, ``shared`` otherwise."""
    return SHARED if set_index is None else f"set-{set_index}"


# --- configuration -------------------------------------------------------------------------------------------


def adapter_folders(path: str | Path) -> list[Path]:
    """The adapter folders at ``path``: one adapter folder itself, or every one under ``path`` or
    ``path/adapters`` (sorted, ``shared`` last)."""
    path = Path(path)
    if (path / ADAPTER_FILE).is_file():
        return [path]
    root = path / ADAPTERS_DIR if (path / ADAPTERS_DIR).is_dir() else path
    found = [f for f in root.iterdir() if (f / ADAPTER_FILE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda f: (f.name == SHARED, len(f.name), f.name))


def _read_record(folder: Path) -> dict:
    record = read_json(folder / ADAPTER_FILE, f"{folder} holds no {ADAPTER_FILE}")
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise ConfigError(f"{folder / ADAPTER_FILE} is not a pudding adapter record ({ADAPTER_FORMAT!r} expected)")
    missing = [f for f in PEFT_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}: not a complete PEFT adapter")
    return record


def check_adapter(record: dict, folder: Path, fingerprint: dict, pool: CandidatePool | None) -> None:
    """ConfigError if the adapter at ``folder`` was trained for another base model or another pool."""
    base = record.get("base_model", {})
    if base.get("fingerprint") != fingerprint:
        raise ConfigError(f"the adapter {folder} was trained for {base.get('name')} {base.get('fingerprint')}, not "
                          f"for this model ({fingerprint}); refusing to apply it")
    if pool is not None and record.get("pool_fingerprint") != pool.fingerprint():
        raise ConfigError(f"the adapter {folder} was trained for pool {record.get('pool_fingerprint')}, not for this "
                          f"artifact's pool {pool.fingerprint()}; refusing to apply it")
    index, blocks = record.get("set_index"), record.get("blocks")
    if pool is not None and index is not None and (index >= len(pool.sets) or list(pool.sets[index].blocks) != blocks):
        raise ConfigError(f"the adapter {folder} is for set {index} omitting {blocks}, which this pool does not have")


class AdapterBank:
    """LoRA adapters loaded onto one model, and the choice of adapter for each omission set.

    ``per-set``: the adapter trained for exactly that set, none for any other set (the dense model included).
    ``shared``: the one shared adapter, for every set and the dense model. PEFT injects the LoRA layers into
    ``model`` itself, so code that runs ``model`` (with :func:`omit_blocks`) runs it healed.
    """

    def __init__(self, peft_model, mode: str, by_blocks: dict[OmissionSet, str], folders: dict[str, Path]):
        self.peft_model, self.mode, self.by_blocks, self.folders = peft_model, mode, by_blocks, folders

    @classmethod
    def load(cls, model, path: str | Path, *, mode: str = "auto", pool: CandidatePool | None = None
             ) -> AdapterBank | None:
        """The adapters at ``path`` (see :func:`adapter_folders`) of ``mode`` onto ``model``; None if none.

        ``mode="auto"`` takes the per-set adapters if there are any, else the shared one. Each adapter is
        checked against ``model``'s fingerprint and (when given) ``pool``.
        """
        if mode not in ("auto", *MODES):
            raise ConfigError(f"adapter mode must be auto, {' or '.join(MODES)}, got {mode!r}")
        records = {f: _read_record(f) for f in adapter_folders(path)}
        modes = {r["mode"] for r in records.values()}
        chosen = mode if mode != "auto" else ("per-set" if "per-set" in modes else SHARED if modes else None)
        records = {f: r for f, r in records.items() if r["mode"] == chosen}
        if not records:
            if mode != "auto":
                raise ConfigError(f"no {mode} adapters at {path}")
            return None
        from pudding.core.quantize import quantization_of

        if quantization_of(model)[0] != "none":  # PEFT finds no nn.Linear to wrap in an int8 block
            raise ConfigError(f"the healing adapters at {path} do not run on a quantized model; use --no-adapters "
                              "(or --adapters none) with --quantize, or drop --quantize")
        fingerprint = model_fingerprint(model.config)
        for folder, record in records.items():
            check_adapter(record, folder, fingerprint, pool)
        return cls._inject(model, records, chosen)

    @classmethod
    def _inject(cls, model, records: dict[Path, dict], mode: str) -> AdapterBank:
        from pudding.core.extras import require

        PeftModel = require("peft", "heal").PeftModel

        peft_model, by_blocks, folders = None, {}, {}
        for folder, record in records.items():
            name = record["name"]
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            else:
                peft_model.load_adapter(str(folder), adapter_name=name)
            folders[name] = folder
            if record["blocks"] is not None:
                by_blocks[tuple(record["blocks"])] = name
        peft_model.eval()
        return cls(peft_model, "shared" if mode == SHARED else mode, by_blocks, folders)

    def adapter_for(self, blocks: OmissionSet) -> str | None:
        """The adapter name that runs with ``blocks`` omitted, or None (the unhealed model)."""
        if self.mode == SHARED:
            return SHARED
        return self.by_blocks.get(tuple(blocks))

    @contextmanager
    def activate(self, blocks: OmissionSet) -> Iterator[str | None]:
        """Make the adapter for ``blocks`` the active one (or disable every adapter) for the context.

        Enter it *outside* :func:`omit_blocks`: PEFT switches the adapter of the modules it can reach, and
        the omitted blocks are not reachable inside.
        """
        name = self.adapter_for(blocks)
        if name is None:
            with self.peft_model.disable_adapter():
                yield None
            return
        self.peft_model.set_adapter(name, inference_mode=True)
        yield name

    def plain_copy(self, blocks: OmissionSet) -> tuple[nn.Module, str | None]:
        """A plain transformers model (no PEFT) with the adapter for ``blocks`` merged into its weights, and
        that adapter's name (None, and no merge, if ``blocks`` has none).

        A deep copy of the full model, then PEFT's ``merge_and_unload``: the live model keeps its adapters
        (an in-place merge and unmerge would not restore its weights bit for bit).
        """
        name = self.adapter_for(blocks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about merging a model it loaded for inference
            copied = copy.deepcopy(self.peft_model)
            plain = copied.merge_and_unload(adapter_names=[name]) if name else copied.unload()
        return plain.eval(), name

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "adapters": {n: str(f) for n, f in self.folders.items()}}
