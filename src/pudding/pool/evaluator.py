"""Score many omission sets on the same requests, running their shared prefix once.

The sets scored together usually share structure: every candidate of a greedy step is the blocks removed so
far (the *base*, here the intersection of the sets) plus one more. The hidden state entering block ``f`` is
decided by the blocks before ``f`` alone, so for a set whose first block outside the base is ``f``, it is
the state entering ``f`` in a pass of the model without the base. :class:`CandidateEvaluator` runs that pass
once per batch, captures each needed block's input with a forward pre-hook (stopping the pass early), and
starts each set's forward at block ``f`` by injecting the captured state there. The result is bit-for-bit
the same computation, minus the repeated prefix. For sets with nothing in common (a pool's) the base is
empty and the shared pass is the dense one. The greedy search, the baselines and the labels all score
through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pudding.core.omit import OmissionSet, get_blocks, omit_blocks
from pudding.core.score import ChoiceScore, LikelihoodScorer, PackedBatch, Request


class _StopForward(Exception):
    """Raised from a pre-hook once every needed block input is captured: the rest of the pass is waste."""


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def block_of(item: int | str) -> int:
    """The block an omission item touches: ``12`` and ``"12.attn"`` are both block 12."""
    return item if isinstance(item, int) else int(str(item).split(".")[0])


def start_block(omitted: Sequence, base: Sequence, total_blocks: int) -> int | None:
    """Where a set can start from a pass of the model without ``base`` (a subset of it): the block of its
    first item outside ``base``, since every block before it runs alike in both. None where that saves
    nothing (block 0) or leaves nothing to inject into (no block from there on is even partly kept)."""
    outside = [block_of(i) for i in omitted if i not in base]
    if not outside or min(outside) == 0:
        return None
    first = min(outside)
    whole_from_first = {i for i in omitted if isinstance(i, int) and i >= first}
    return first if len(whole_from_first) < total_blocks - first else None


def capture_block_inputs(model, batch: PackedBatch, base: Sequence, needed: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states entering each block in ``needed`` in ``model`` without ``base``, from one pass that stops
    at the last one. No block in ``needed`` may be wholly in ``base`` (it would never run)."""
    if not needed:
        return {}
    blocks, states, last = get_blocks(model), {}, max(needed)

    def capture(index):
        def hook(module, args, kwargs):
            states[index] = _hidden_states_arg(args, kwargs)
            if index == last:
                raise _StopForward
        return hook

    # Hooked by module, before the omission takes the base's blocks out of the list.
    handles = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(needed)]
    try:
        with torch.inference_mode(), omit_blocks(model, base):
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return states


@contextmanager
def started_at(model, start: int, omitted: Sequence, state: torch.Tensor) -> Iterator[None]:
    """``model`` without ``omitted`` and without every block before ``start``, its first remaining block fed
    ``state``: the hidden state entering block ``start`` (the residual stream passes through omitted blocks,
    so that is exactly the first remaining block's input). Forwards inside run only from ``start`` on."""
    from_start = [i for i in omitted if block_of(i) >= start]
    with omit_blocks(model, [*range(start), *from_start]):
        handle = get_blocks(model)[0].register_forward_pre_hook(
            lambda module, args, kwargs: _with_hidden_states(args, kwargs, state), with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


@dataclass
class ReuseStats:
    """Block executions actually run, against what the same evaluations cost without prefix reuse."""

    blocks_run: int = 0
    blocks_without_reuse: int = 0

    @property
    def ratio(self) -> float:
        return self.blocks_without_reuse / self.blocks_run if self.blocks_run else 1.0


class CandidateEvaluator:
    """Scores one fixed list of requests under many omission sets, reusing the shared dense prefix.

    Args:
        scorer: the scorer (its model and batching settings are used).
        requests: the requests to score under every omission set.
        reuse_prefix: run the blocks before each set's first omitted block once per batch, not once per set.
    """

    def __init__(self, scorer: LikelihoodScorer, requests: Sequence[Request], reuse_prefix: bool = True):
        self.scorer = scorer
        self.model = scorer.model
        self.batches: list[PackedBatch] = scorer.pack(requests)
        self.n_requests = len(requests)
        self.total_blocks = len(get_blocks(self.model))
        self.reuse_prefix = reuse_prefix
        self.stats = ReuseStats()

    def evaluate(self, omissions: Sequence[OmissionSet]) -> list[list[ChoiceScore]]:
        """For each omission set, the scores of every request (in request order)."""
        results: list[list[ChoiceScore | None]] = [[None] * self.n_requests for _ in omissions]
        base = tuple(sorted(set.intersection(*map(set, omissions)))) if omissions else ()
        starts = [self._start(omitted, base) for omitted in omissions]
        needed = {f for f in starts if f is not None}
        for batch in self.batches:
            rows = batch.input_ids.shape[0]
            states = self._block_inputs(batch, base, needed)
            if needed:
                self.stats.blocks_run += rows * sum(1 for b in range(max(needed)) if b not in base)
            for result, omitted, start in zip(results, omissions, starts):
                for index, score in zip(batch.indices, self._score(batch, omitted, start, states)):
                    result[index] = score
                kept = self.total_blocks - len(omitted)
                skipped = 0 if start is None else sum(1 for b in range(start) if b not in omitted)
                self.stats.blocks_without_reuse += rows * kept
                self.stats.blocks_run += rows * (kept - skipped)
        return results  # type: ignore[return-value]

    def _start(self, omitted: OmissionSet, base: OmissionSet) -> int | None:
        return start_block(omitted, base, self.total_blocks) if self.reuse_prefix else None

    def _block_inputs(self, batch: PackedBatch, base: OmissionSet, needed: set[int]) -> dict[int, torch.Tensor]:
        return capture_block_inputs(self.model, batch, base, needed)

    def _score(self, batch: PackedBatch, omitted: OmissionSet, start: int | None,
               states: dict[int, torch.Tensor]) -> list[ChoiceScore]:
        if start is None:
            with omit_blocks(self.model, omitted):
                return self.scorer.score_packed(batch)
        with started_at(self.model, start, omitted, states[start]):
            return self.scorer.score_packed(batch)


# --- the greedy search ------------------------------------------------------------------------------------
