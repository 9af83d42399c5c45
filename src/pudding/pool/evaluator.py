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
from dataclasses import dataclass, field

import torch

from pudding.core.omit import OmissionSet, get_blocks, omission_key, omit_blocks
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


def run_cost(omitted: Sequence, base: Sequence, total_blocks: int) -> int:
    """Blocks a set's forward executes when it starts from a shared pass without ``base`` (:func:`start_block`):
    its kept blocks from that start on. In a greedy step a candidate early in the model costs the most."""
    start = start_block(omitted, base, total_blocks) or 0
    return sum(1 for block in range(start, total_blocks) if block not in omitted)


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


BASE = -1  # a run's source: the shared pass without the sets' common blocks


@dataclass
class _Run:
    """One distinct set's forward per batch: where it starts, from whose state, and what later runs read."""

    omitted: OmissionSet
    source: int | None = None  # BASE, or the index in the plan of an earlier run; None: a full forward
    start: int | None = None  # the position it starts at (the residual stream entering block ``start``)
    captures: dict[int, int] = field(default_factory=dict)  # position -> the block whose input holds it


def _first_kept(omitted: Sequence[int], position: int, total: int) -> int | None:
    return next((b for b in range(position, total) if b not in omitted), None)


def plan_runs(omissions: Sequence[OmissionSet], total: int) -> tuple[list[_Run], OmissionSet, dict[int, int]]:
    """The order and starting points of the forwards that score ``omissions`` (distinct, sorted sets).

    The residual stream entering position ``f`` depends only on which blocks before ``f`` run. So a set ``T``
    may start at ``f`` from any run ``S`` that agrees with it on every block before ``f`` (``f`` = the smallest
    block in one set and not the other), if ``S`` ran the block whose input holds that state. The sources are
    the runs before it (sorted order puts sets with long common beginnings next to each other) and one shared
    pass without the blocks every set omits (a greedy step's removed blocks: each candidate then starts at its
    own block). Each set takes the source that lets it start latest. Returns the runs in order, the shared
    pass's omitted blocks, and the positions to capture in that pass (position -> block to hook).
    """
    base = omission_key(set.intersection(*map(set, omissions)), None) if omissions else ()
    # Sets naming sub-layers start from the shared pass only: agreeing "on every block before f" is a
    # whole-block test, and a greedy step (the shape sub-layer searches score) shares little else.
    whole_blocks = not any(isinstance(i, str) for o in omissions for i in o)
    runs: list[_Run] = []
    base_captures: dict[int, int] = {}
    for omitted in (sorted(omissions) if whole_blocks else omissions):
        run = _Run(omitted)
        best = start_block(omitted, base, total)
        if best is not None:
            run.source, run.start = BASE, best
        for index, earlier in enumerate(runs if whole_blocks else ()):
            differ = set(earlier.omitted) ^ set(omitted)
            position = min(differ)
            if position <= (run.start or 0) or _first_kept(omitted, position, total) is None:
                continue
            holder = _first_kept(earlier.omitted, position, total)  # its input is the state at ``position``
            if holder is None or (earlier.start is not None and holder < earlier.start):
                continue
            run.source, run.start = index, position
        if run.source == BASE:
            base_captures[run.start] = _first_kept(base, run.start, total)
        elif run.source is not None:
            runs[run.source].captures[run.start] = _first_kept(runs[run.source].omitted, run.start, total)
        runs.append(run)
    return runs, base, base_captures


class CandidateEvaluator:
    """Scores one fixed list of requests under many omission sets, reusing every prefix they share.

    Args:
        scorer: the scorer (its model and batching settings are used).
        requests: the requests to score under every omission set.
        reuse_prefix: start each set from a shared state where one exists (:func:`plan_runs`), not from scratch.
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
        """For each omission set, the scores of every request (in request order). A set listed twice is
        scored once."""
        distinct = list(dict.fromkeys(tuple(o) for o in omissions))
        if self.reuse_prefix:
            runs, base, base_captures = plan_runs(distinct, self.total_blocks)
        else:
            runs, base, base_captures = [_Run(o) for o in distinct], (), {}
        scores: dict[OmissionSet, list[ChoiceScore | None]] = {run.omitted: [None] * self.n_requests for run in runs}
        for batch in self.batches:
            rows = batch.input_ids.shape[0]
            held = capture_block_inputs(self.model, batch, base, set(base_captures.values()))
            base_states = {position: held[block] for position, block in base_captures.items()}
            if base_captures:
                self.stats.blocks_run += rows * sum(1 for b in range(max(base_captures.values())) if b not in base)
            captured: list[dict[int, torch.Tensor]] = []
            for run in runs:
                state = (None if run.source is None else base_states[run.start] if run.source == BASE
                         else captured[run.source][run.start])
                batch_scores, states = self._run(batch, run, state)
                captured.append(states)
                for index, score in zip(batch.indices, batch_scores):
                    scores[run.omitted][index] = score
                kept = self.total_blocks - len(run.omitted)
                skipped = 0 if run.start is None else sum(1 for b in range(run.start) if b not in run.omitted)
                self.stats.blocks_run += rows * (kept - skipped)
            for omitted in omissions:
                self.stats.blocks_without_reuse += rows * (self.total_blocks - len(omitted))
        return [scores[tuple(o)] for o in omissions]  # type: ignore[misc]

    def _run(self, batch: PackedBatch, run: _Run, state: torch.Tensor | None
             ) -> tuple[list[ChoiceScore], dict[int, torch.Tensor]]:
        """Score ``batch`` under ``run``'s set, from ``state`` at its start if it has one, keeping the states
        that later runs start from."""
        blocks, kept = get_blocks(self.model), {}  # by original index: the omission shortens the list

        def keep(position):
            def hook(module, args, kwargs):
                kept[position] = _hidden_states_arg(args, kwargs)
            return hook

        with (omit_blocks(self.model, run.omitted) if state is None
              else started_at(self.model, run.start, run.omitted, state)):
            # Registered after the injection hook, so a capture on the first block sees the injected state.
            handles = [blocks[block].register_forward_pre_hook(keep(position), with_kwargs=True)
                       for position, block in run.captures.items()]
            try:
                return self.scorer.score_packed(batch), kept
            finally:
                for handle in handles:
                    handle.remove()


# --- the greedy search ------------------------------------------------------------------------------------
