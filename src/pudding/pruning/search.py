"""Greedy (SLEB-style) search for an omission set, under a pluggable objective.

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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.identity import StepCheckpoint
from pudding.core.metrics import gold_choice_logprob, margin, scores_by_doc
from pudding.core.omit import OmissionSet, check_k, parse_omission, removable_blocks
from pudding.core.score import ChoiceScore, Request
from pudding.core.tasks import MCDoc, get_task
from pudding.pool.evaluator import CandidateEvaluator

CHECKPOINT_FORMAT = "pudding.search-checkpoint/1"
SUBLAYER_CHECKPOINT_FORMAT = "pudding.sublayer-search-checkpoint/1"
GRANULARITIES = ("block", "sublayer")


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


def _choice_prob_loss(docs: Sequence[MCDoc], scores: Sequence[ChoiceScore]) -> float:
    # Minus the gold's log-probability among the choices under the task's own metric: TL rewards a likelier
    # gold even when a wrong choice rises with it, which on SmolLM2 picked sets that lose accuracy.
    metrics = {task: get_task(task).metric for task in {d.task for d in docs}}
    return -sum(gold_choice_logprob(doc, metrics[d.task]) for d, doc in zip(docs, scores_by_doc(docs, scores)))


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
        Objective("choice-prob", "minus the summed log-probability of the gold among the choices, under the "
                  "task's metric (acc or acc_norm): the smooth form of accuracy", _all_choices, _choice_prob_loss),
        Objective("ppl", "log-perplexity of BoolQ passages (SLEB's criterion)", _passages, _ppl_loss, "boolq"),
    )
}


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; UnknownNameError listing the known ones."""
    if name not in OBJECTIVES:
        raise UnknownNameError(f"unknown objective {name!r}; known objectives: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


# --- scoring many omission sets, reusing the prefix -------------------------------------------------------


@dataclass(frozen=True)
class SearchStep:
    """One greedy step: the block (or sub-layer) removed, the loss with it removed, and every candidate's loss."""

    removed: int | str
    loss: float
    candidate_losses: dict[int, float] | dict[str, float]
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


def _read_step(step: dict) -> SearchStep:
    return SearchStep(step["removed"], step["loss"], {int(k): v for k, v in step["candidate_losses"].items()},
                      step["seconds"])


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
    state = StepCheckpoint(Path(checkpoint) if checkpoint else None, identity or {}, CHECKPOINT_FORMAT, "search",
                           _read_step, {"base_loss": None})
    state.load()
    removable = removable_blocks(total, barriers)
    if state.fields["base_loss"] is None:
        state.fields["base_loss"] = loss(evaluator.evaluate([()])[0])
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
    return SearchResult(tuple(steps), state.fields["base_loss"], seconds, evaluator.stats.ratio)


def _greedy_step(evaluator, loss, removable: list[int], removed: list[int]) -> SearchStep:
    start = time.perf_counter()
    candidates = [b for b in removable if b not in removed]
    omissions = [tuple(sorted([*removed, b])) for b in candidates]
    losses = {b: loss(scores) for b, scores in zip(candidates, evaluator.evaluate(omissions))}
    best = min(candidates, key=lambda b: (losses[b], b))
    return SearchStep(best, losses[best], losses, time.perf_counter() - start)


# --- the same search over sub-layers, at a budget of k blocks -------------------------------------------------


SubLayerStep = SearchStep
"""A sub-layer search's step (or FinerCut's): ``removed`` is a sub-layer (``"12.attn"``), and FinerCut's loss is the
divergence from the dense model."""


@dataclass(frozen=True)
class SubLayerSearchResult:
    """Sub-layers in removal order and the loss after each removal; FinerCut's result too (its loss is the
    divergence from the dense model, so its ``base_loss`` is 0)."""

    steps: tuple[SubLayerStep, ...]
    total_blocks: int
    base_loss: float = 0.0
    costs: dict[str, float] = field(default_factory=dict)  # blocks' worth of parameters per sub-layer, if known

    @property
    def removal_order(self) -> list[str]:
        return [s.removed for s in self.steps]

    @property
    def omission(self) -> tuple[int | str, ...]:
        """The chosen set's canonical key, e.g. ``(3, "12.attn")``: what ``pudding eval --omit`` takes. A block
        with both sub-layers removed is the whole block."""
        return parse_omission(self.removal_order, self.total_blocks).key

    @property
    def trajectory(self) -> list[float]:
        return [self.base_loss, *[s.loss for s in self.steps]]

    @property
    def block_equivalents(self) -> float:
        return sum(self.costs[s] for s in self.removal_order)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


def read_sublayer_step(step: dict) -> SubLayerStep:
    return SubLayerStep(step["removed"], step["loss"], dict(step["candidate_losses"]), step["seconds"])


def affordable(costs: dict[str, float], removed: Sequence[str], budget: float) -> list[str]:
    """The sub-layers not yet removed whose cost fits what is left of ``budget``, in ``costs``' order.

    >>> affordable({"3.attn": 0.25, "3.mlp": 0.75, "4.attn": 0.25}, ["3.mlp"], 1.0)
    ['3.attn', '4.attn']
    """
    left = budget - sum(costs[r] for r in removed)
    return [c for c, cost in costs.items() if c not in removed and cost <= left + 1e-9]


def sublayer_search(
    evaluator: CandidateEvaluator,
    loss: Callable[[Sequence[ChoiceScore]], float],
    budget: float,
    costs: dict[str, float],
    *,
    checkpoint: str | Path | None = None,
    identity: dict | None = None,
    progress: bool | str = False,
) -> SubLayerSearchResult:
    """The greedy search over single sub-layers (a block's attention or MLP) at a budget of ``budget`` blocks.

    ``costs`` maps every removable sub-layer, in block order, to its size in blocks' worth of parameters
    (:func:`pudding.pruning.finercut.sublayer_costs`); barriers are applied by leaving sub-layers out of it.
    Each step removes the candidate with the lowest ``loss`` among those that still fit the budget, so a
    cheap attention can be taken where a whole block would not fit; the search stops when nothing fits.
    Removed compute is therefore at most ``budget`` blocks, matching a whole-block search at ``k = budget``.
    Ties go to the earlier sub-layer in ``costs``. Checkpointed like :func:`greedy_search`, but the budget
    belongs in ``identity``: it decides which candidates a step may take, so a different budget is another search.
    """
    if not costs or budget <= 0 or budget >= sum(costs.values()):
        raise ConfigError(f"a sub-layer search needs a budget above 0 and below the {sum(costs.values()):.2f} "
                          f"blocks' worth of removable sub-layers, not {budget}")
    total = evaluator.total_blocks
    state = StepCheckpoint(Path(checkpoint) if checkpoint else None, identity or {}, SUBLAYER_CHECKPOINT_FORMAT,
                           "sub-layer search", read_sublayer_step, {"base_loss": None})
    state.load()
    if state.fields["base_loss"] is None:
        state.fields["base_loss"] = loss(evaluator.evaluate([()])[0])
        state.save()
    desc = progress if isinstance(progress, str) else "sub-layer search"
    removed = [s.removed for s in state.steps]
    with tqdm(unit="set", desc=desc, disable=not progress) as bar:
        while candidates := affordable(costs, removed, budget):
            state.steps.append(_sublayer_step(evaluator, loss, candidates, removed, total))
            state.save()
            removed.append(state.steps[-1].removed)
            bar.update(len(candidates))
    return SubLayerSearchResult(tuple(state.steps), total, state.fields["base_loss"], dict(costs))


def _sublayer_step(evaluator, loss, candidates: list[str], removed: list[str], total: int) -> SubLayerStep:
    start = time.perf_counter()
    omissions = [parse_omission([*removed, c], total).key for c in candidates]
    losses = {c: loss(scores) for c, scores in zip(candidates, evaluator.evaluate(omissions))}
    best = min(candidates, key=lambda c: (losses[c], candidates.index(c)))
    return SubLayerStep(best, losses[best], losses, time.perf_counter() - start)
