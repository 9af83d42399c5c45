"""Memory proportional to the kept blocks: block weights live on disk and only the needed ones are resident.

:class:`BlockStore` writes every block's tensors once to a safetensors file (``blocks.safetensors``, read
memory-mapped) and the rest of the model (embeddings, final norm, head) to ``rest.safetensors``. A block that
is not needed holds no storage: its parameters are ``meta`` tensors. ``ensure(kept)`` loads the blocks a
routing decision keeps and drops the others, so consecutive prompts that choose different sets only load
or drop the difference. With a ``budget_bytes`` larger than the kept set, recently used blocks stay
resident (least recently used go first), which makes switching back cheap.

:func:`build_lazy_model` builds a model straight from that cache without ever materialising the dense
weights: the non-block parts are created normally (so every buffer, e.g. rotary frequencies, is right)
and the blocks are created on the ``meta`` device.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pudding.core.errors import ConfigError
from pudding.core.omit import get_architecture, get_blocks
from pudding.core.provenance import atomic_output

BLOCKS_FILE = "blocks.safetensors"
REST_FILE = "rest.safetensors"
CONFIG_FILE = "config.json"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def resident_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers that have storage (meta tensors count zero)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


@dataclass(frozen=True)
class Switch:
    """What one ``ensure`` call did."""

    loaded: tuple[int, ...]
    dropped: tuple[int, ...]
    seconds: float


def _release(block: nn.Module) -> None:
    """Give every tensor of ``block``'s state a meta twin: same shapes, no storage."""
    state = block.state_dict()
    block.load_state_dict({k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()},
                          assign=True)


def _block_prefix(model: nn.Module) -> str:
    return get_architecture(model.config).blocks_path


def write_cache(model: nn.Module, folder: str | Path) -> Path:
    """Write ``blocks.safetensors`` ("<block>.<tensor>") and ``rest.safetensors`` for ``model``; idempotent."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if (folder / BLOCKS_FILE).exists() and (folder / REST_FILE).exists() and (folder / CONFIG_FILE).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    prefix = _block_prefix(model) + "."
    blocks = {f"{i}.{k}": v.detach().contiguous() for i, block in enumerate(get_blocks(model))
              for k, v in block.state_dict().items()}
    # Tied weights (embeddings = head) appear twice in the state dict: keep one name per storage.
    rest, seen = {}, set()
    for key, value in model.state_dict().items():
        if key.startswith(prefix) or value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        rest[key] = value.detach().contiguous()
    for name, tensors in ((BLOCKS_FILE, blocks), (REST_FILE, rest)):
        with atomic_output(folder / name) as tmp:
            save_file(tensors, str(tmp))
    model.config.to_json_file(folder / CONFIG_FILE)
    return folder


class BlockStore:
    """Keeps only the needed blocks of ``model`` resident, reading them from ``folder/blocks.safetensors``.

    Args:
        model: a model whose blocks match the cache (they are released on construction).
        folder: a cache written by :func:`write_cache`.
        budget_bytes: resident block bytes allowed; ``None`` keeps exactly the kept blocks. Must hold at
            least one block.
    """

    def __init__(self, model: nn.Module, folder: str | Path, budget_bytes: int | None = None):
        from safetensors import safe_open

        self.model = model
        self.path = Path(folder) / BLOCKS_FILE
        self._file = safe_open(str(self.path), framework="pt")
        blocks = get_blocks(model)
        self.names = {i: [k for k in self._file.keys() if k.split(".", 1)[0] == str(i)] for i in range(len(blocks))}
        # meta tensors keep their shape and dtype, so this holds whether a block is resident or not
        self.block_size = {i: sum(t.numel() * t.element_size() for t in block.state_dict().values())
                           for i, block in enumerate(blocks)}
        largest = max(self.block_size.values())
        if budget_bytes is not None and budget_bytes < largest:
            raise ConfigError(f"a memory budget of {budget_bytes} bytes cannot hold one block ({largest} bytes)")
        self.budget = budget_bytes
        self.resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
        for _, block in enumerate(blocks):
            if resident_bytes(block):
                _release(block)

    def _load(self, index: int) -> None:
        prefix = f"{index}."
        state = {k[len(prefix):]: self._file.get_tensor(k) for k in self.names[index]}
        get_blocks(self.model)[index].load_state_dict(state, assign=True)

    def ensure(self, kept: Iterable[int]) -> Switch:
        """Make exactly the blocks in ``kept`` available (plus recently used ones within the budget)."""
        start = time.perf_counter()
        kept = list(dict.fromkeys(kept))
        loaded = []
        for index in kept:
            if index in self.resident:
                self.resident.move_to_end(index)
            else:
                self._load(index)
                self.resident[index] = None
                loaded.append(index)
        dropped = []
        limit = self.budget if self.budget is not None else 0
        for index in list(self.resident):
            if index in kept:
                continue
            if self.budget is None or self.resident_block_bytes() > limit:
                _release(get_blocks(self.model)[index])
                del self.resident[index]
                dropped.append(index)
        return Switch(tuple(loaded), tuple(dropped), time.perf_counter() - start)

    def resident_block_bytes(self) -> int:
        return sum(self.block_size[i] for i in self.resident)


def build_lazy_model(folder: str | Path):
    """A model from a :func:`write_cache` folder with the non-block weights loaded and every block on meta.

    The model is built on the meta device (so every attribute derived from the config is right), then the
    non-block weights are assigned from ``rest.safetensors`` and the non-block buffers (e.g. rotary
    frequencies, which are computed, not saved) are taken from a block-less copy built on the CPU.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    prefix = get_architecture(config).blocks_path + "."
    skeleton_buffers = dict(AutoModelForCausalLM.from_config(_skeleton_config(config)).named_buffers())
    for name, _ in list(model.named_buffers()):
        if not name.startswith(prefix) and name in skeleton_buffers:
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = skeleton_buffers[name]
    _, unexpected = model.load_state_dict(load_file(str(folder / REST_FILE)), strict=False, assign=True)
    if unexpected:
        raise ConfigError(f"{folder / REST_FILE} does not fit this model: unexpected {unexpected[:3]}")
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.device.type == "meta" and not n.startswith(prefix)]
    if left:
        raise ConfigError(f"the lazy model has non-block tensors without weights: {left[:3]}")
    return model.eval()


def _skeleton_config(config):
    """``config`` with no blocks, so the non-block parts can be built without allocating any block."""
    skeleton = type(config).from_dict(config.to_dict())
    skeleton.num_hidden_layers = 0
    if isinstance(getattr(skeleton, "layer_types", None), list):
        skeleton.layer_types = []
    return skeleton


def cache_metadata(folder: str | Path) -> dict:
    return json.loads((Path(folder) / CONFIG_FILE).read_text())
