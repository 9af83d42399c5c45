"""LaCo (Layer Collapse; Yang, Cao and Zhao, EMNLP Findings 2024, arXiv:2402.11187) as a static baseline.

LaCo collapses a run of adjacent blocks into the first one by its RDSC rule ("reserving differences while
seeking common"), equation (1) of the paper::

    theta*_l = theta_l + sum_{i=1..m} (theta_{l+i} - theta_l)

and deletes blocks ``l+1 .. l+m``. A merge is kept only if the merged model's last hidden states on the
calibration text stay close to the original model's: the mean over calibration sequences of the cosine
similarity of the flattened (tokens x hidden) final representations must exceed a threshold ``T``. The
paper's Algorithm 1 sweeps from the top down: the merge base ``l`` starts at ``H - C`` (``C`` blocks per
merge: the base and the ``C - 1`` after it), moves down by the interval ``I`` after an accepted merge and by
one after a rejected one, and stops below ``L``.

Where ours differs (docs/MERGE_BASELINES.md has the full list):

- **Exactly k blocks.** The paper removes however many blocks its threshold allows. With ``k`` set, a merge
  takes at most the blocks still to remove, and a sweep that ends short of ``k`` is repeated from the top
  with a lower threshold (:func:`next_threshold`), so the tables can compare at k=6 and k=3. ``k=None``
  runs the paper's single sweep.
- **Norms are not merged.** Like the authors' released notebook, which merges the attention and MLP
  projections, a merged block keeps its base block's normalisation weights.
- **The merge rule is the paper's equation**, not the released notebook's code, whose in-place update makes
  each difference relative to the already-updated base and so leaves the base equal to the *last* merged
  block (LaCo issues #4 and #5). ``rule="released_code"`` reproduces that behaviour for comparison.
- **Calibration text** is BoolQ passages, the same as every other static baseline here, not the paper's
  five Wikipedia sentence prefixes; **L and H** default to the same barriers as the other baselines (the
  first and the last block are never merged).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.load import DEFAULT_MODEL
from pudding.core.omit import get_blocks, omit_blocks, prune_blocks
from pudding.core.provenance import locks_output
from pudding.core.score import PackedBatch
from pudding.pruning.compress import (
    COMMON_FIELDS,
    base_model_record,
    check_common,
    final_hidden,
    pack_text,
    prepare,
    save_compressed,
)

# --- the merge rule --------------------------------------------------------------------------------------


def _is_norm(module: nn.Module) -> bool:
    # Every family's norm class has "Norm" in its name (LlamaRMSNorm, LayerNorm, Gemma3RMSNorm, ...).
    return "norm" in type(module).__name__.lower()


def mergeable_parameters(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's parameters that a merge changes: all but those of its normalisation layers."""
    norms = {name for name, module in block.named_modules() if name and _is_norm(module)}
    return {name: p for name, p in block.named_parameters()
            if not any(name == n or name.startswith(n + ".") for n in norms)}


def _rdsc(base: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    return base + sum(other - base for other in others)


def _released_code(base: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    # The notebook's `base.add_(other - base)` in a loop: each step makes base equal to that other block.
    return others[-1].clone()


MERGE_RULES: dict[str, Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]] = {
    "rdsc": _rdsc,
    "released_code": _released_code,
}


@torch.no_grad()
def merge_into(base: nn.Module, others: Sequence[nn.Module], rule: str = "rdsc") -> None:
    """Collapse ``others`` into ``base`` in place: ``theta_base + sum(theta_other - theta_base)`` (rule ``rdsc``).

    Blocks must share an architecture; normalisation weights stay the base's (see the module docstring).
    """
    combine = MERGE_RULES[rule]
    targets = [mergeable_parameters(o) for o in others]
    for name, param in mergeable_parameters(base).items():
        param.copy_(combine(param.detach().clone(), [t[name].detach() for t in targets]))


# --- settings ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LacoConfig:
    """Settings of ``pudding compress --method laco``; each field's help text is its documentation (its flag's).

    ``k=None`` (no flag) runs the paper's single sweep, as many merges as the threshold allows. The barriers
    give the paper's L = barriers[0] and H = n - barriers[1] (exclusive). ``out=None``: build only, in memory.
    """

    model: str = field(default=DEFAULT_MODEL, metadata=COMMON_FIELDS["model"])
    k: int | None = field(default=6, metadata=COMMON_FIELDS["k"])
    merge_layers: int = field(default=4, metadata={
        "type": "positive_int", "help": "the paper's C: blocks per merge (the base and the C-1 collapsed into it)"})
    interval: int = field(default=2, metadata={
        "type": "positive_int", "help": "the paper's I: how far the merge base moves down after a merge"})
    threshold: float = field(default=0.65, metadata={"help": "the paper's T: the similarity a merge must exceed"})
    relax_step: float = field(default=0.05, metadata={
        "help": "the least a sweep that ends short of k lowers the threshold by"})
    barriers: tuple[int, int] = field(default=(1, 1), metadata=COMMON_FIELDS["barriers"])
    rule: str = field(default="rdsc", metadata={
        "choices": tuple(MERGE_RULES), "help": "rdsc (the paper's equation 1) or released_code (what the "
                                               "authors' notebook computes)"})
    samples: int = field(default=16, metadata=COMMON_FIELDS["samples"])
    max_length: int = field(default=256, metadata=COMMON_FIELDS["max_length"])
    max_batch_tokens: int = field(default=512, metadata=COMMON_FIELDS["max_batch_tokens"])
    out: str | None = field(default=None, metadata=COMMON_FIELDS["out"])
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        object.__setattr__(self, "barriers", check_common(self.k, self.samples, self.max_length,
                                                          self.max_batch_tokens, self.barriers))
        if self.rule not in MERGE_RULES:
            raise UnknownNameError(f"unknown LaCo merge rule {self.rule!r}; known: {', '.join(MERGE_RULES)}")
        if isinstance(self.merge_layers, bool) or not isinstance(self.merge_layers, int) or self.merge_layers < 2:
            raise ConfigError(f"merge_layers (C) must be an integer of at least 2, got {self.merge_layers!r}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ConfigError(f"interval (I) must be a positive integer, got {self.interval!r}")
        if not (isinstance(self.threshold, int | float) and -1.0 <= self.threshold <= 1.0):
            raise ConfigError(f"threshold (T) must be a cosine similarity in [-1, 1], got {self.threshold!r}")
        step = self.relax_step
        if not (isinstance(step, int | float) and math.isfinite(step) and 0 < step <= 2):
            raise ConfigError(f"relax_step must be in (0, 2], got {self.relax_step!r}")

    def layer_range(self, total: int) -> tuple[int, int]:
        """``(L, H)`` for a model of ``total`` blocks: blocks L..H-1 may take part in a merge.

        Raises ConfigError if the range cannot hold a merge, or (with ``k``) if k blocks cannot be removed
        from it (at most H - L - 1: one block of the range is always kept).
        """
        low, high = self.barriers[0], total - self.barriers[1]
        if high - low < 2:
            raise ConfigError(f"barriers {self.barriers} leave {max(high - low, 0)} of the {total} blocks to merge; "
                              "a merge needs at least 2")
        if self.k is not None and self.k > high - low - 1:
            raise ConfigError(f"k={self.k} is too large: merging blocks {low}..{high - 1} of {total} removes at most "
                              f"{high - low - 1} (one block of the range must remain)")
        return low, high


# --- the collapse ------------------------------------------------------------------------------------------


def representation_similarity(model, batches: Sequence[PackedBatch], reference: Sequence[torch.Tensor]) -> float:
    """Mean over sequences of cos(flattened final hidden states of ``model``, flattened ``reference``).

    The paper's ``Avg_Cos_Sim``: each sequence's (tokens x hidden) representation as one vector, real tokens only.
    """
    sims: list[float] = []
    for batch, ref in zip(batches, reference):
        hidden, mask = final_hidden(model, batch).float(), batch.attention_mask.unsqueeze(-1).float()
        dot = (hidden * ref * mask).sum((1, 2))
        norms = ((hidden * hidden * mask).sum((1, 2)) * (ref * ref * mask).sum((1, 2))).sqrt()
        sims.extend((dot / norms.clamp_min(1e-12)).tolist())
    return sum(sims) / len(sims)


def next_threshold(threshold: float, best_rejected: float | None, step: float) -> float:
    """The threshold of the next sweep when one ends short of k: at least ``step`` lower, and just below the
    best similarity the last sweep rejected, so the next one can accept a merge (the paper has no such rule).

    >>> round(next_threshold(0.65, 0.40, 0.05), 6)
    0.399999
    """
    lowered = threshold - step
    return lowered if best_rejected is None else min(lowered, best_rejected - 1e-6)


@dataclass
class _Collapse:
    """The working state of one collapse: which original blocks each current block holds, and the log."""

    origin: list[list[int]]
    removed: int = 0
    log: list[dict[str, Any]] | None = None


def _try_merge(model, base: int, count: int, rule: str, batches, reference) -> tuple[float, dict[str, torch.Tensor]]:
    """Merge blocks base+1..base+count into ``base`` in place and measure; returns (similarity, saved base)."""
    blocks = get_blocks(model)
    saved = {name: p.detach().clone() for name, p in mergeable_parameters(blocks[base]).items()}
    merge_into(blocks[base], [blocks[base + i] for i in range(1, count + 1)], rule)
    with omit_blocks(model, range(base + 1, base + 1 + count)):
        return representation_similarity(model, batches, reference), saved


def _restore(block: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in mergeable_parameters(block).items():
            param.copy_(saved[name])


def _sweep(model, config: LacoConfig, state: _Collapse, low: int, high: int, threshold: float, sweep: int,
           batches, reference, bar) -> float | None:
    """One top-down pass of Algorithm 1; merges in place. Returns the best rejected similarity (None if none)."""
    target = math.inf if config.k is None else config.k
    top = high - state.removed  # blocks above the range's top have shifted down by the removed ones
    # The paper starts at H - C; clamped to L so that a range narrower than C (or one that earlier merges
    # have shrunk) still gets its merge tried.
    base, best_rejected = max(top - config.merge_layers, low), None
    while base >= low and state.removed < target:
        count = min(config.merge_layers - 1, top - base - 1, target - state.removed)
        if count < 1:
            base -= 1
            continue
        similarity, saved = _try_merge(model, base, count, config.rule, batches, reference)
        accepted = similarity > threshold
        merged = [b for group in state.origin[base + 1:base + 1 + count] for b in group]
        state.log.append({"sweep": sweep, "threshold": threshold, "base_block": state.origin[base][0],
                          "merged_blocks": merged, "similarity": similarity, "accepted": accepted})
        bar.update(1)
        if accepted:
            prune_blocks(model, range(base + 1, base + 1 + count), inplace=True)
            state.origin[base:base + 1 + count] = [[*state.origin[base], *merged]]
            state.removed += count
            top -= count
            base -= config.interval
        else:
            _restore(get_blocks(model)[base], saved)
            best_rejected = similarity if best_rejected is None else max(best_rejected, similarity)
            base -= 1
    return best_rejected


def collapse(model, batches: Sequence[PackedBatch], config: LacoConfig) -> dict[str, Any]:
    """Run LaCo on ``model`` in place (it ends with ``n - removed`` blocks); return what happened.

    The reference representations are the model's own before any merge. Returns ``{"removed", "blocks"
    (per remaining block, the original blocks merged into it), "merges" (every attempt), "final_threshold"}``.
    """
    total = len(get_blocks(model))
    low, high = config.layer_range(total)
    reference = [final_hidden(model, batch).float() for batch in batches]
    state = _Collapse([[b] for b in range(total)], log=[])
    threshold, sweep = float(config.threshold), 0
    with tqdm(desc="LaCo merges tried", unit="merge", disable=not config.progress) as bar:
        while True:
            best_rejected = _sweep(model, config, state, low, high, threshold, sweep, batches, reference, bar)
            if config.k is None or state.removed >= config.k:
                break
            threshold, sweep = next_threshold(threshold, best_rejected, config.relax_step), sweep + 1
            if threshold < -1.0 - config.relax_step:  # below every cosine: only a NaN similarity gets here
                raise ConfigError(f"LaCo accepted no merge even at threshold {threshold:.3f}; the similarity "
                                  "is not a number (degenerate calibration text or model?)")
    return {"removed": state.removed, "blocks": state.origin, "merges": state.log, "final_threshold": threshold,
            "sweeps": sweep + 1, "final_similarity": representation_similarity(model, batches, reference)}


# --- the stage entry point ---------------------------------------------------------------------------------


@locks_output("out")
def laco(config: LacoConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Collapse ``config.model`` with LaCo and, if ``config.out`` is set, save it as an HF checkpoint there.

    Pass a loaded ``model`` and ``tokenizer`` to skip loading (the model is then changed in place). Returns the
    record also written to ``compress.json`` (with ``"model"``: the collapsed model, in memory).
    """
    model, tokenizer, total, docs = prepare(config, model, tokenizer, config.layer_range)
    start = time.perf_counter()
    result = collapse(model, pack_text(model, tokenizer, docs, config.max_length, config.max_batch_tokens), config)
    record = {"method": "laco", "k": result["removed"], "original_num_blocks": total,
              "num_blocks": total - result["removed"], "blocks": result["blocks"],
              "base_model": base_model_record(config.model, model.config), "config": asdict(config),
              "calibration": {"task": "boolq", "text": "passages", "doc_ids": [d.doc_id for d in docs]},
              "result": {key: result[key] for key in ("merges", "final_threshold", "sweeps", "final_similarity")},
              "seconds": round(time.perf_counter() - start, 2)}
    if config.out is not None:
        save_compressed(model, tokenizer, config.out, record)
    return {**record, "model": model}
