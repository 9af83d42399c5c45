"""The static depth-pruning baselines the paper compares against, as one-shot block rankings.

Each method scores every removable block once on calibration text, then removes the ``k`` least important:

- ``shortened_ppl`` (Shortened-LLaMA, PPL criterion): the log-perplexity with that block alone removed;
- ``taylor`` (Shortened-LLaMA, Taylor+ criterion): sum over the block's weights of |weight x gradient| of the
  language-modelling loss on the calibration text;
- ``shortgpt`` (ShortGPT, Block Influence): 1 - cosine(block input, block output), averaged over real tokens.

SLEB is the greedy search with the ``ppl`` objective (:mod:`pudding.pruning.search`). All methods use the same
calibration text (BoolQ passages offline, see ``search.OBJECTIVES['ppl']``) and the same barriers as the
search, so the only difference between rows of a comparison is the criterion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from pudding.core.errors import UnknownNameError
from pudding.core.omit import get_blocks, removable_blocks
from pudding.core.score import LikelihoodScorer, PackedBatch, Request
from pudding.pool.artifact import least_important
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.search import OBJECTIVES


@dataclass(frozen=True)
class Ranking:
    """Per-block importance (higher = more important) and the k blocks a one-shot method removes."""

    method: str
    importance: dict[int, float]
    blocks: tuple[int, ...]
    seconds: float


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def shortened_ppl_importance(scorer: LikelihoodScorer, requests: Sequence[Request],
                             candidates: list[int]) -> dict[int, float]:
    """Log-perplexity of the calibration text with each candidate block alone removed."""
    evaluator = CandidateEvaluator(scorer, requests)
    scores = evaluator.evaluate([(b,) for b in candidates])
    loss = OBJECTIVES["ppl"].loss
    return {b: loss([], s) for b, s in zip(candidates, scores)}


def taylor_importance(scorer: LikelihoodScorer, requests: Sequence[Request],
                      candidates: list[int]) -> dict[int, float]:
    """Sum of |w * dL/dw| over each block's weights, L the mean token NLL of the calibration text."""
    model, blocks = scorer.model, get_blocks(scorer.model)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in scorer.pack(requests):
            _nll(model, batch).backward()
    with torch.no_grad():
        importance = {b: sum(float((p * p.grad).abs().sum()) for p in blocks[b].parameters() if p.grad is not None)
                      for b in candidates}
    model.zero_grad(set_to_none=True)
    return importance


def _nll(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits[:, :-1]
    labels = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum") / (labels != -100).sum()


def shortgpt_importance(scorer: LikelihoodScorer, requests: Sequence[Request],
                        candidates: list[int]) -> dict[int, float]:
    """Block Influence: mean over real tokens of 1 - cos(block input, block output)."""
    blocks, totals, count = get_blocks(scorer.model), {b: 0.0 for b in candidates}, 0
    current_mask: list[torch.Tensor] = []

    def hook(index):
        def record(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            cosine = nn.functional.cosine_similarity(hidden_in.float(), _block_output(output).float(), dim=-1)
            totals[index] += float(((1 - cosine) * current_mask[0]).sum())
        return record

    handles = [blocks[b].register_forward_hook(hook(b), with_kwargs=True) for b in candidates]
    try:
        with torch.inference_mode():
            for batch in scorer.pack(requests):
                current_mask[:] = [batch.attention_mask.float()]
                count += int(batch.attention_mask.sum())
                scorer.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {b: total / count for b, total in totals.items()}


ONE_SHOT_METHODS: dict[str, Callable[[LikelihoodScorer, Sequence[Request], list[int]], dict[int, float]]] = {
    "shortened_ppl": shortened_ppl_importance,
    "taylor": taylor_importance,
    "shortgpt": shortgpt_importance,
}


def rank_blocks(method: str, scorer: LikelihoodScorer, requests: Sequence[Request], k: int,
                barriers: tuple[int, int] = (1, 1)) -> Ranking:
    """Score every removable block with ``method`` and pick the ``k`` least important (ties: lowest index)."""
    if method not in ONE_SHOT_METHODS:
        raise UnknownNameError(f"unknown one-shot method {method!r}; known: {', '.join(ONE_SHOT_METHODS)}")
    start = time.perf_counter()
    candidates = removable_blocks(len(get_blocks(scorer.model)), barriers)
    importance = ONE_SHOT_METHODS[method](scorer, requests, candidates)
    return Ranking(method, importance, least_important(importance, k), time.perf_counter() - start)


