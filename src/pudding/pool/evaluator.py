"""Score many omission sets on the same requests, running the dense prefix once.

Blocks before the first omitted one compute the same hidden states for every candidate set.
:class:`CandidateEvaluator` runs that prefix once per batch, captures each needed block's input with a
forward pre-hook (stopping the pass early), and starts each set's forward at its first omitted block by
injecting the captured state there. The result is bit-for-bit the same computation, minus the repeated
prefix. The greedy search, the baselines and the labels all score through it.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        for batch in self.batches:
            rows = batch.input_ids.shape[0]
            states = self._block_inputs(batch, {o[0] for o in omissions if self._reusable(o)})
            self.stats.blocks_run += rows * max(states, default=0)
            for result, omitted in zip(results, omissions):
                for index, score in zip(batch.indices, self._score(batch, omitted, states)):
                    result[index] = score
                kept = self.total_blocks - len(omitted)
                prefix = omitted[0] if self._reusable(omitted) and omitted[0] in states else 0
                self.stats.blocks_without_reuse += rows * kept
                self.stats.blocks_run += rows * (kept - prefix)
        return results  # type: ignore[return-value]

    def _reusable(self, omitted: OmissionSet) -> bool:
        # Reuse needs a non-empty prefix and a kept block after the first omitted one to inject into.
        if not (self.reuse_prefix and omitted and omitted[0] > 0):
            return False
        blocks_from_first = self.total_blocks - omitted[0]
        return blocks_from_first > len(omitted)

    def _block_inputs(self, batch: PackedBatch, needed: set[int]) -> dict[int, torch.Tensor]:
        """Dense hidden states entering each block in ``needed``, from one pass that stops at the last one."""
        if not needed:
            return {}
        blocks, states, last = get_blocks(self.model), {}, max(needed)

        def capture(index):
            def hook(module, args, kwargs):
                states[index] = _hidden_states_arg(args, kwargs)
                if index == last:
                    raise _StopForward
            return hook

        handles = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in sorted(needed)]
        try:
            with torch.inference_mode():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return states

    def _score(self, batch: PackedBatch, omitted: OmissionSet, states: dict[int, torch.Tensor]) -> list[ChoiceScore]:
        first = omitted[0] if omitted else None
        if not self._reusable(omitted) or first not in states:
            with omit_blocks(self.model, omitted):
                return self.scorer.score_packed(batch)
        # Skip the prefix too, and feed its cached output into the first kept block (the residual stream
        # passes through the omitted blocks, so the prefix output is exactly that block's input).
        with omit_blocks(self.model, tuple(range(first)) + omitted):
            handle = get_blocks(self.model)[0].register_forward_pre_hook(
                lambda module, args, kwargs: _with_hidden_states(args, kwargs, states[first]), with_kwargs=True)
            try:
                return self.scorer.score_packed(batch)
            finally:
                handle.remove()


# --- the greedy search ------------------------------------------------------------------------------------
