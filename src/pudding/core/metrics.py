"""Metrics over scored multiple-choice documents.

``acc`` and ``acc_norm`` follow lm-evaluation-harness exactly: the predicted choice is the first argmax of
the summed continuation log-likelihood (``acc``) or of that sum divided by the answer option's character
length (``acc_norm``: ``len(choice)``, without the target delimiter, as lm-eval's ``process_results``); the
standard error of a mean is the sample standard deviation over sqrt(N).

The paper's two search objectives are per document, on *mean per-token* log-likelihoods:

- task likelihood (TL): the gold answer's mean per-token log-likelihood;
- margin: gold's mean per-token log-likelihood minus the mean of the wrong choices' ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pudding.core.score import ChoiceScore


@dataclass(frozen=True)
class DocScores:
    """Scores of every choice of one document, with the gold index."""

    doc_id: str
    gold: int
    choices: tuple[ChoiceScore, ...]
    choice_chars: tuple[int, ...]  # each answer option's length, the divisor of acc_norm

    def to_json(self) -> dict:
        return {
            "doc_id": self.doc_id,
            "gold": self.gold,
            "logprobs": [c.logprob for c in self.choices],
            "n_tokens": [c.n_tokens for c in self.choices],
            "n_chars": list(self.choice_chars),
            "n_bytes": [c.n_bytes for c in self.choices],
        }


def scores_by_doc(docs: Sequence, scores: Sequence[ChoiceScore]) -> list[DocScores]:
    """Regroup a flat list of choice scores (all choices of docs[0], then docs[1], ...) per document.

    ``docs`` need ``doc_id``, ``gold``, ``n_choices`` and ``choice_chars`` (e.g. :class:`pudding.core.tasks.MCDoc`).
    """
    flat = iter(scores)
    return [DocScores(d.doc_id, d.gold, tuple(next(flat) for _ in range(d.n_choices)), tuple(d.choice_chars))
            for d in docs]


def first_argmax(values: Sequence[float]) -> int:
    # np.argmax semantics: ties go to the first index, as in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def acc(doc: DocScores) -> float:
    """1.0 if the highest summed log-likelihood is the gold choice."""
    return float(first_argmax([c.logprob for c in doc.choices]) == doc.gold)


def acc_norm(doc: DocScores) -> float:
    """1.0 if the highest log-likelihood per character of the answer option is the gold choice (lm-eval's
    length normalisation)."""
    return float(first_argmax([c.logprob / n for c, n in zip(doc.choices, doc.choice_chars)]) == doc.gold)


def task_likelihood(doc: DocScores) -> float:
    """The gold answer's mean per-token log-likelihood (higher is better; the TL loss is its negative)."""
    return doc.choices[doc.gold].mean_logprob


def choice_scores(logprobs: Sequence[float], chars: Sequence[int], metric: str) -> list[float]:
    """What the task's metric compares: summed log-likelihoods (``acc``), or per character (``acc_norm``),
    rescaled by the mean length so the values stay in nats (the argmax is unchanged)."""
    if metric != "acc_norm":
        return list(logprobs)
    mean_chars = sum(chars) / len(chars)
    return [lp / c * mean_chars for lp, c in zip(logprobs, chars)]


def gold_choice_logprob(doc: DocScores, metric: str) -> float:
    """The gold's log-probability after a softmax over the choices' metric scores (:func:`choice_scores`):
    the smooth form of being right under ``acc`` or ``acc_norm``."""
    scores = choice_scores([c.logprob for c in doc.choices], doc.choice_chars, metric)
    top = max(scores)
    return scores[doc.gold] - top - math.log(sum(math.exp(v - top) for v in scores))


def margin(doc: DocScores) -> float:
    """Gold mean per-token log-likelihood minus the mean over the wrong choices (the paper's "diff")."""
    wrong = [c.mean_logprob for i, c in enumerate(doc.choices) if i != doc.gold]
    return task_likelihood(doc) - sum(wrong) / len(wrong)


METRICS: dict[str, Callable[[DocScores], float]] = {
    "acc": acc,
    "acc_norm": acc_norm,
    "task_likelihood": task_likelihood,
    "margin": margin,
}


@dataclass(frozen=True)
class Aggregate:
    """Mean of a per-document metric with its standard error and sample count."""

    value: float
    stderr: float
    n: int


def mean_with_stderr(values: Sequence[float]) -> Aggregate:
    """Mean and lm-eval's ``mean_stderr``: sample standard deviation (ddof=1) over sqrt(N)."""
    n = len(values)
    if n == 0:
        raise ValueError("cannot aggregate an empty list of values")
    mean = sum(values) / n
    if n == 1:
        return Aggregate(mean, float("nan"), 1)
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Aggregate(mean, math.sqrt(variance) / math.sqrt(n), n)


def aggregate(docs: Sequence[DocScores], metric: str) -> Aggregate:
    """Aggregate ``metric`` (a key of :data:`METRICS`) over ``docs``."""
    return mean_with_stderr([METRICS[metric](d) for d in docs])
