"""Stage 5 of the pipeline: greedy (SLEB-style) search for an omission set, under a pluggable objective.

The search removes ``k`` blocks one at a time. Each step scores every remaining removable block with the
blocks already chosen still omitted, and drops the one whose removal gives the lowest loss. Barriers keep
the first and last blocks (by default one each) out of reach.

Objectives (:data:`OBJECTIVES`) turn calibration documents into scoring requests and scores into a loss:

- ``tl``: the paper's task likelihood, minus the sum over documents of the gold answer's mean per-token
  log-likelihood;
- ``margin``: the paper's "diff", minus the sum of (gold mean log-likelihood - mean over wrong choices);
- ``ppl``: SLEB's criterion, the mean per-token negative log-likelihood of generic text (the log of the
  perplexity, so the argmin is the same). Offline there is no WikiText, so the text is BoolQ's Wikipedia
  passages from the calibration split.

**Prefix reuse.** Blocks before the first omitted one compute the same hidden states for every candidate.
:class:`CandidateEvaluator` runs that prefix once per batch and step, captures each needed block's input
with a forward pre-hook (stopping the pass early), and starts each candidate's forward at its first kept
block by injecting the captured state there. The result is bit-for-bit the same computation, minus the
repeated prefix.

Every step is checkpointed atomically; a restarted search replays the checkpoint and continues.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pudding.errors import ConfigError, UnknownNameError
from pudding.metrics import margin, scores_by_doc
from pudding.omit import OmissionSet, get_blocks, omit_blocks
from pudding.provenance import atomic_write_json, differing_keys
from pudding.score import ChoiceScore, LikelihoodScorer, PackedBatch, Request
from pudding.tasks import MCDoc

CHECKPOINT_FORMAT = "pudding.search-checkpoint/1"


# --- objectives -------------------------------------------------------------------------------------------


def _all_choices(docs: Sequence[MCDoc]) -> list[Request]:
    return [Request(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]


def _gold_only(docs: Sequence[MCDoc]) -> list[Request]:
    return [Request(d.contexts[d.gold], d.continuations[d.gold]) for d in docs]


def _passages(docs: Sequence[MCDoc]) -> list[Request]:
    # BoolQ contexts are "{passage}\nQuestion: ...": the passage alone is the generic (Wikipedia) text.
    return [Request("", d.contexts[0].rsplit("\nQuestion:", 1)[0]) for d in docs]


def _tl_loss(docs: Sequence[MCDoc], scores: Sequence[ChoiceScore]) -> float:
    return -sum(s.mean_logprob for s in scores)


def _margin_loss(docs: Sequence[MCDoc], scores: Sequence[ChoiceScore]) -> float:
    return -sum(margin(d) for d in scores_by_doc(docs, scores))


def _ppl_loss(docs: Sequence[MCDoc], scores: Sequence[ChoiceScore]) -> float:
    return -sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores)


@dataclass(frozen=True)
class Objective:
    """A search criterion: which requests to score for a list of documents, and how scores become a loss."""

    name: str
    description: str
    requests: Callable[[Sequence[MCDoc]], list[Request]]
    loss: Callable[[Sequence[MCDoc], Sequence[ChoiceScore]], float]
    text_task: str | None = None  # if set, the objective reads this task's calibration docs, not the search task's


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("tl", "minus the summed mean log-likelihood of the gold answer", _gold_only, _tl_loss),
        Objective("margin", "minus the summed (gold - mean wrong) mean log-likelihood", _all_choices, _margin_loss),
        Objective("ppl", "log-perplexity of BoolQ passages (SLEB's criterion)", _passages, _ppl_loss, "boolq"),
    )
}


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; UnknownNameError listing the known ones."""
    if name not in OBJECTIVES:
        raise UnknownNameError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# --- scoring many omission sets, reusing the prefix -------------------------------------------------------


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


@dataclass(frozen=True)
class SearchStep:
    """One greedy step: the block removed, the loss with it removed, and every candidate's loss."""

    removed: int
    loss: float
    candidate_losses: dict[int, float]
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a greedy search: blocks in removal order and the loss trajectory."""

    steps: tuple[SearchStep, ...]
    base_loss: float
    seconds: float
    reuse_ratio: float

    @property
    def removal_order(self) -> list[int]:
        return [s.removed for s in self.steps]

    @property
    def blocks(self) -> OmissionSet:
        return tuple(sorted(self.removal_order))

    @property
    def trajectory(self) -> list[float]:
        return [self.base_loss, *[s.loss for s in self.steps]]


def removable_blocks(total: int, barriers: tuple[int, int]) -> list[int]:
    """Blocks the search may remove: all but the first ``barriers[0]`` and the last ``barriers[1]``."""
    first, last = barriers
    if first < 0 or last < 0:
        raise ConfigError(f"barriers must be non-negative, got {barriers}")
    return list(range(first, total - last))


def check_k(k: int, total: int, barriers: tuple[int, int]) -> None:
    """ConfigError unless 1 <= k < number of removable blocks."""
    removable = len(removable_blocks(total, barriers))
    if not 1 <= k < removable:
        raise ConfigError(f"k={k} must be at least 1 and below the {removable} removable blocks "
                          f"({total} blocks, barriers {barriers[0]} first / {barriers[1]} last)")


@dataclass
class _Checkpoint:
    path: Path | None
    identity: dict
    base_loss: float | None = None
    steps: list[SearchStep] = field(default_factory=list)

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            saved_identity, steps = data["identity"], data["steps"]
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"checkpoint {self.path} is corrupt or not a search checkpoint ({error}); "
                              "delete it to start over") from None
        if saved_identity != self.identity:
            differing = differing_keys(saved_identity, self.identity)
            raise ConfigError(f"checkpoint {self.path} was written for another model or configuration "
                              f"(differs in: {', '.join(differing)}); refusing to resume. Delete it or choose "
                              "another run directory")
        self.base_loss = data["base_loss"]
        self.steps = [SearchStep(s["removed"], s["loss"], {int(k): v for k, v in s["candidate_losses"].items()},
                                 s["seconds"]) for s in steps]

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"format": CHECKPOINT_FORMAT, "identity": self.identity,
                                          "base_loss": self.base_loss, "steps": [asdict(s) for s in self.steps]})


def greedy_search(
    evaluator: CandidateEvaluator,
    loss: Callable[[Sequence[ChoiceScore]], float],
    k: int,
    *,
    barriers: tuple[int, int] = (1, 1),
    checkpoint: str | Path | None = None,
    identity: dict | None = None,
    progress: bool | str = False,
) -> SearchResult:
    """Remove ``k`` blocks greedily, each step minimising ``loss`` over the remaining removable blocks.

    ``loss`` maps the scores of the evaluator's requests to a number (lower is better). With ``checkpoint``
    every step is saved atomically, together with ``identity`` (what the search was configured with); a
    rerun with the same identity resumes after the last saved step, one with another identity is refused.
    ``k`` belongs in no identity: the first j steps are the same whatever ``k`` is, so the checkpoint of a
    longer search answers a shorter one from its first ``k`` steps, and a shorter one extends to a larger k.
    Ties go to the lowest block index.
    """
    total = evaluator.total_blocks
    check_k(k, total, barriers)
    state = _Checkpoint(Path(checkpoint) if checkpoint else None, identity or {})
    state.load()
    removable = removable_blocks(total, barriers)
    if state.base_loss is None:
        state.base_loss = loss(evaluator.evaluate([()])[0])
        state.save()
    n_evals = sum(len(removable) - step for step in range(k))
    done = sum(len(removable) - step for step in range(min(k, len(state.steps))))
    desc = progress if isinstance(progress, str) else "search"
    with tqdm(total=n_evals, initial=done, unit="set", desc=desc, disable=not progress) as bar:
        while len(state.steps) < k:
            state.steps.append(_greedy_step(evaluator, loss, removable, [s.removed for s in state.steps]))
            state.save()
            bar.update(len(removable) - len(state.steps) + 1)
    steps = state.steps[:k]
    # Summed per step, so a resumed search reports its whole cost, not just the part after the restart.
    seconds = sum(s.seconds for s in steps)
    return SearchResult(tuple(steps), state.base_loss, seconds, evaluator.stats.ratio)


def _greedy_step(evaluator, loss, removable: list[int], removed: list[int]) -> SearchStep:
    start = time.perf_counter()
    candidates = [b for b in removable if b not in removed]
    omissions = [tuple(sorted([*removed, b])) for b in candidates]
    losses = {b: loss(scores) for b, scores in zip(candidates, evaluator.evaluate(omissions))}
    best = min(candidates, key=lambda b: (losses[b], b))
    return SearchStep(best, losses[best], losses, time.perf_counter() - start)
