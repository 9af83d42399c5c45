"""lm-eval's acc / acc_norm / stderr and the paper's TL and margin, checked by hand."""

import math

import pytest

from pudding.core.metrics import DocScores, acc, acc_norm, aggregate, margin, mean_with_stderr, task_likelihood
from pudding.core.score import ChoiceScore


def _choice(logprob, n_tokens=1, n_chars=1):
    return ChoiceScore(logprob=logprob, n_tokens=n_tokens, n_bytes=n_chars, n_chars=n_chars, is_greedy=False)


def _doc(doc_id, gold, choices, choice_chars=None):
    return DocScores(doc_id, gold, choices, choice_chars or tuple(1 for _ in choices))


def test_acc_uses_summed_logprob_and_acc_norm_divides_by_characters():
    # Choice 0 has the higher sum, choice 1 the higher per-character score.
    doc = _doc("d", 1, (_choice(-4.0, n_chars=3), _choice(-6.0, n_chars=11)), choice_chars=(2, 10))
    assert acc(doc) == 0.0
    assert acc_norm(doc) == 1.0
    # The divisor is the option's own length, not the continuation's (which carries the " " delimiter).
    assert acc_norm(_doc("d", 1, (_choice(-2.0, n_chars=3), _choice(-4.5, n_chars=5)), choice_chars=(2, 4))) == 0.0


def test_ties_go_to_the_first_choice_as_numpy_argmax():
    assert acc(_doc("d", 0, (_choice(-1.0), _choice(-1.0)))) == 1.0
    assert acc(_doc("d", 1, (_choice(-1.0), _choice(-1.0)))) == 0.0


def test_task_likelihood_and_margin_use_mean_per_token_loglikelihoods():
    doc = _doc("d", 0, (_choice(-2.0, n_tokens=4), _choice(-3.0, n_tokens=2), _choice(-1.0, n_tokens=1)))
    assert task_likelihood(doc) == pytest.approx(-0.5)
    assert margin(doc) == pytest.approx(-0.5 - (-1.5 + -1.0) / 2)


def test_stderr_is_sample_std_over_sqrt_n():
    values = [1.0, 0.0, 1.0, 1.0]
    agg = mean_with_stderr(values)
    assert agg.value == 0.75 and agg.n == 4
    assert agg.stderr == pytest.approx(math.sqrt(sum((v - 0.75) ** 2 for v in values) / 3) / 2)
    assert math.isnan(mean_with_stderr([1.0]).stderr)
    with pytest.raises(ValueError):
        mean_with_stderr([])


def test_aggregate_by_name():
    docs = [_doc(str(i), i % 2, (_choice(-1.0), _choice(-2.0))) for i in range(4)]
    assert aggregate(docs, "acc").value == 0.5
