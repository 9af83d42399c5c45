"""FinerCut (Zhang et al. 2024, "FinerCut: Finer-grained Interpretable Layer Pruning for Large Language Models").

A static baseline that removes single **sub-layers** (a block's attention or its MLP) rather than whole
blocks, greedily: each step tries every remaining removable sub-layer with the ones already chosen still
removed, and drops the one whose removal changes the model's output distribution least. The change is the
Jensen-Shannon divergence between the dense model's next-token distribution and the pruned model's, averaged
over the real tokens of the calibration text. Both sub-layers of one block removed make a whole block.

Where ours differs from the paper and its code (``YaNgZhAnG-V5/llm_dissect``, ``scripts/prune_layer.py`` with
the ``Output`` evaluator's ``js_divergence``):

- calibration text: the same BoolQ passages as every other baseline here (``search.OBJECTIVES['ppl']``), not
  WikiText, so the rows of a comparison differ only by their criterion;
- the divergence is the textbook JS(P, Q) = (KL(P || M) + KL(Q || M)) / 2 per token, averaged over real
  (non-padding) tokens; their code averages ``F.kl_div`` terms over the vocabulary as well, which rescales
  every candidate alike (the same argmin up to that) but also takes the KL the other way round;
- protected layers: the search's barriers (the first and last block are never touched), where their script
  protects a leading fraction of layers until the pruning ratio reaches it;
- budget: ``2k`` sub-layers for a comparison at ``k`` blocks (:func:`sublayer_budget`), the paper's own
  "fraction of layers removed" counting attention and MLP alike. Attention is the smaller share of a block's
  compute, so the artifact also records how many blocks' worth of parameters the removed sub-layers hold.

Every step is checkpointed atomically with the run's identity; a rerun resumes, and a longer run's
checkpoint answers a shorter one from its first steps (each step depends only on the steps before it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.identity import StepCheckpoint
from pudding.core.omit import SUBLAYERS, get_architecture, get_blocks, omit_blocks, parse_omission, removable_blocks
from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer, PackedBatch, Request
from pudding.pool.evaluator import capture_block_inputs, start_block, started_at
from pudding.pruning.search import SubLayerSearchResult, SubLayerStep, read_sublayer_step

CHECKPOINT_FORMAT = "pudding.finercut-checkpoint/1"
SUBBLOCK_FILE = "subblock_sets.json"
SUBBLOCK_FORMAT = "pudding.subblock-sets/1"
SUBBLOCK_METHODS = ("finercut",)
"""Baseline methods whose result names sub-layers; they are stored in :data:`SUBBLOCK_FILE`, not pool.json."""


def sublayer_budget(k: int) -> int:
    """Sub-layers FinerCut removes for a comparison at ``k`` blocks: ``2k``, as many as ``k`` blocks hold."""
    if k < 1:
        raise ConfigError(f"k must be a positive integer, got {k}")
    return 2 * k


def sublayer_candidates(total: int, barriers: tuple[int, int]) -> list[str]:
    """Every removable sub-layer, ``"b.attn"`` then ``"b.mlp"`` per removable block ``b``, in block order."""
    return [f"{b}.{name}" for b in removable_blocks(total, barriers) for name in SUBLAYERS]


# --- the criterion ----------------------------------------------------------------------------------------


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen-Shannon divergence (nats) between distributions given as log-probabilities (..., V).

    >>> round(float(js_divergence(torch.log(torch.tensor([1.0, 0.0])), torch.log(torch.tensor([0.0, 1.0])))), 4)
    0.6931
    """
    logp, logq = logp.float(), logq.float()
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2.0)

    def kl_to_m(logx):
        x = logx.exp()
        # 0 * log 0 is 0; written out so that a -inf log-probability cannot make a NaN.
        return torch.where(x > 0, x * (logx - logm), torch.zeros_like(x)).sum(-1)

    return 0.5 * (kl_to_m(logp) + kl_to_m(logq))


class DivergenceEvaluator:
    """Mean per-token JS divergence from the dense model, of the model under each of many omission sets.

    The dense log-probabilities of every real token of ``requests`` are computed once and kept (fp32, so
    tokens x vocabulary x 4 bytes: ~0.4 GB for 2,000 tokens of a 49k vocabulary).
    """

    def __init__(self, scorer: LikelihoodScorer, requests: Sequence[Request]):
        self.model = scorer.model
        self.batches: list[PackedBatch] = scorer.pack(requests)
        self.total_blocks = len(get_blocks(self.model))
        self.n_tokens = sum(int(b.attention_mask.sum()) for b in self.batches)
        self.reference = [self._log_probs(batch) for batch in self.batches]

    def _log_probs(self, batch: PackedBatch) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids, use_cache=False).logits
        return torch.log_softmax(logits[batch.attention_mask.bool()].float(), dim=-1)

    def evaluate(self, omissions: Sequence, on_batch: Callable[[float], Any] | None = None) -> list[float]:
        """For each omission set (anything :func:`pudding.core.omit.parse_omission` takes), the mean JS divergence.

        The sets start from one pass without the items they share (a greedy step's removed sub-layers), as in
        :class:`pudding.pool.evaluator.CandidateEvaluator`: the same numbers, minus the repeated prefix.
        ``on_batch(fraction)`` is called after each set's batch with that batch's share of one set (progress).
        """
        keys = [parse_omission(o, self.total_blocks).key for o in omissions]
        base = [i for i in keys[0] if all(i in k for k in keys[1:])] if keys else []
        starts = [start_block(k, base, self.total_blocks) for k in keys]
        totals = [0.0] * len(keys)
        for batch, reference in zip(self.batches, self.reference):
            states = capture_block_inputs(self.model, batch, base, {f for f in starts if f is not None})
            for index, (key, start) in enumerate(zip(keys, starts)):
                with (omit_blocks(self.model, key) if start is None
                      else started_at(self.model, start, key, states[start])):
                    totals[index] += float(js_divergence(reference, self._log_probs(batch)).sum())
                if on_batch is not None:
                    on_batch(1 / len(self.batches))
        return [total / self.n_tokens for total in totals]


# --- the greedy search ------------------------------------------------------------------------------------


FinerCutResult = SubLayerSearchResult
"""FinerCut's sub-layers in removal order and the divergence after each removal (from 0, the dense model's)."""


def finercut_search(
    evaluator: DivergenceEvaluator,
    n_remove: int,
    *,
    barriers: tuple[int, int] = (1, 1),
    checkpoint: str | Path | None = None,
    identity: dict | None = None,
    progress: bool | str = False,
) -> FinerCutResult:
    """Remove ``n_remove`` sub-layers greedily, each step minimising the JS divergence from the dense model.

    Candidates are the attention and MLP of every block inside ``barriers``; ties go to the lower block,
    attention before MLP. With ``checkpoint`` every step is saved atomically with ``identity``; a rerun
    with the same identity resumes, one with another identity is refused. ``n_remove`` belongs in no
    identity: a longer run's first steps are the shorter run.
    """
    candidates = sublayer_candidates(evaluator.total_blocks, barriers)
    if not 1 <= n_remove < len(candidates):
        raise ConfigError(f"FinerCut must remove at least 1 and fewer than the {len(candidates)} removable sub-layers "
                          f"({evaluator.total_blocks} blocks, barriers {barriers[0]} first / {barriers[1]} last), "
                          f"not {n_remove}")
    state = StepCheckpoint(Path(checkpoint) if checkpoint else None, identity or {}, CHECKPOINT_FORMAT, "FinerCut",
                           read_sublayer_step)
    state.load()
    n_evals = sum(len(candidates) - step for step in range(n_remove))
    done = sum(len(candidates) - step for step in range(min(n_remove, len(state.steps))))
    desc = progress if isinstance(progress, str) else "finercut"
    with tqdm(total=n_evals, initial=done, unit="set", desc=desc, disable=not progress) as bar:
        while len(state.steps) < n_remove:
            state.steps.append(_step(evaluator, candidates, [s.removed for s in state.steps], bar))
            state.save()
    return FinerCutResult(tuple(state.steps[:n_remove]), evaluator.total_blocks)


def _step(evaluator: DivergenceEvaluator, candidates: list[str], removed: list[str], bar) -> SubLayerStep:
    start = time.perf_counter()
    remaining = [c for c in candidates if c not in removed]
    # All candidates at once, so they share the pass without the removed sub-layers; the bar moves per batch.
    losses = dict(zip(remaining, evaluator.evaluate([[*removed, c] for c in remaining], on_batch=bar.update)))
    best = min(remaining, key=lambda c: (losses[c], candidates.index(c)))
    return SubLayerStep(best, losses[best], losses, time.perf_counter() - start)


# --- the artifact -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubBlockSet:
    """A baseline's sub-block omission set, with what it cost and how it compares with whole blocks.

    Attributes:
        method: ``"finercut"``.
        omit: the set as ``pudding eval --omit`` takes it, e.g. ``"3,12.attn"``.
        removal_order: sub-layers in the order the search removed them.
        trajectory: the JS divergence from the dense model before and after each removal.
        budget: the matching rule and what was removed: ``k``, ``sublayers``, ``attn`` and ``mlp`` counts,
            ``block_equivalents`` (removed parameters / the parameters of one block, on average).
        sample_ids: the calibration documents.
        seconds: search time, summed over resumed runs.
    """

    method: str
    omit: str
    removal_order: list[str]
    trajectory: list[float]
    budget: dict[str, Any]
    sample_ids: list[str]
    seconds: float


def block_equivalents(model, removed: Sequence[int | str]) -> float:
    """Parameters of the ``removed`` sub-layers (``"12.attn"``) and whole blocks (``12``), in units of the mean
    parameter count of one block."""
    arch, blocks = get_architecture(model.config), get_blocks(model)

    def params(block, path):
        module = block.get_submodule(path)
        return sum(p.numel() for p in module.parameters())

    per_block = sum(sum(p.numel() for p in b.parameters()) for b in blocks) / len(blocks)
    total = 0
    for item in removed:
        if isinstance(item, int):
            total += sum(p.numel() for p in blocks[item].parameters())
            continue
        block, name = item.split(".")
        paths = (arch.attention_path,) if name == "attn" else arch.mlp_paths
        total += sum(params(blocks[int(block)], path) for path in paths)
    return total / per_block


def sublayer_costs(model, barriers: tuple[int, int]) -> dict[str, float]:
    """Every removable sub-layer (:func:`sublayer_candidates`' order) and its :func:`block_equivalents`, rounded
    to 4 places: a sub-layer search's budget unit, kept in its checkpoint's identity."""
    total = len(get_blocks(model))
    return {name: round(block_equivalents(model, [name]), 4) for name in sublayer_candidates(total, barriers)}


def run_finercut(scorer: LikelihoodScorer, requests: Sequence[Request], k: int, *, barriers: tuple[int, int],
                 checkpoint: str | Path | None, identity: dict, sample_ids: list[str],
                 progress: bool | str = False) -> SubBlockSet:
    """FinerCut at the compute budget of ``k`` blocks (:func:`sublayer_budget`), as a :class:`SubBlockSet`."""
    result = finercut_search(DivergenceEvaluator(scorer, requests), sublayer_budget(k), barriers=barriers,
                             checkpoint=checkpoint, identity=identity, progress=progress)
    order = result.removal_order
    budget = {"rule": "2k sub-layers for k blocks", "k": k, "sublayers": len(order),
              "attn": sum(o.endswith(".attn") for o in order), "mlp": sum(o.endswith(".mlp") for o in order),
              "block_equivalents": round(block_equivalents(scorer.model, order), 4)}
    return SubBlockSet("finercut", ",".join(map(str, result.omission)), order, result.trajectory, budget,
                       sample_ids, round(result.seconds, 2))


def save_subblock_sets(directory: str | Path, sets: Sequence[SubBlockSet], model: dict, config: dict) -> Path:
    """Write ``directory/subblock_sets.json`` atomically. It sits beside a baselines pool.json and is kept out of
    it, so every reader of pool.json keeps seeing sets of whole blocks only."""
    return atomic_write_json(Path(directory) / SUBBLOCK_FILE, {
        "format": SUBBLOCK_FORMAT, "model": model, "config": config, "provenance": provenance(),
        "sets": [asdict(s) for s in sets]})


def load_subblock_sets(directory: str | Path) -> list[SubBlockSet]:
    """The sets of a ``subblock_sets.json`` (or of the folder holding one), each checked against its model."""
    path = Path(directory)
    path = path / SUBBLOCK_FILE if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
        if data.get("format") != SUBBLOCK_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {SUBBLOCK_FORMAT!r}")
        total = data["model"]["fingerprint"]["num_blocks"]
        sets = [SubBlockSet(**{k: s[k] for k in SubBlockSet.__dataclass_fields__}) for s in data["sets"]]
    except FileNotFoundError:
        raise ConfigError(f"no sub-block sets at {path}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a valid sub-block set file: {error}") from None
    for entry in sets:
        parse_omission(entry.omit, total)
    return sets
