"""The batched scorer equals the naive one-request-at-a-time loop, for every family and batch shape."""

from __future__ import annotations

import math

import pytest
import torch

from pudding.core.omit import omit_blocks
from pudding.core.score import LikelihoodScorer, Request, encode_request, score_one_by_one

from tiny import TINY_CONFIGS, tiny_model, tiny_tokenizer

QUESTIONS = [
    ("Question: Which technology was developed most recently?\nAnswer:", [" cellular telephone", " television", " a"]),
    ("The man turned on the faucet. Water flowed", [" because the valve opened.", " from the spout"]),
    ("Sarah was a much better surgeon ", [" than Maria", " so she always got the easier cases"]),  # trailing space
    ("How do I ready a guinea pig cage?\nAnswer:", [" yes", " no"]),
    ("Which word comes first in the sentence here?\nAnswer:", [" a", " the"]),  # single-token continuations
    ("A revolving door is convenient for two direction travel, but it also serves as a security measure at a"
     " what?\nAnswer:", [" bank vault", " library", " department store", " mall"]),  # long shared context
]
SINGLES = [
    Request("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    Request("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    Request("", " A revolving door"),  # empty context: scored after a prefix token, as lm-eval does
]
REQUESTS = [Request(c, x) for c, choices in QUESTIONS for x in choices] + SINGLES


def _assert_scores_equal(got, want, atol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert math.isclose(g.logprob, w.logprob, abs_tol=atol), (g, w)
        assert (g.n_tokens, g.n_bytes, g.n_chars) == (w.n_tokens, w.n_bytes, w.n_chars)
        assert g.is_greedy == w.is_greedy


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("max_batch_tokens", [8, 64, 4096])
def test_batched_scorer_equals_naive_loop(model_type, max_batch_tokens):
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    want = score_one_by_one(model, tokenizer, REQUESTS)
    got = LikelihoodScorer(model, tokenizer, max_batch_tokens=max_batch_tokens).score(REQUESTS)
    _assert_scores_equal(got, want)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("share_context", [True, False])
def test_scorer_ignores_tokenizer_padding_side_and_sharing_mode(padding_side, share_context):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    want = score_one_by_one(model, tokenizer, REQUESTS)
    tokenizer.padding_side = padding_side
    try:
        got = LikelihoodScorer(model, tokenizer, max_batch_tokens=48, share_context=share_context).score(REQUESTS)
    finally:
        tokenizer.padding_side = "right"
    _assert_scores_equal(got, want)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2"])
def test_scorer_inside_omission_equals_naive_loop_inside_omission(model_type):
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    with omit_blocks(model, [0, 2]):
        want = score_one_by_one(model, tokenizer, REQUESTS)
        got = LikelihoodScorer(model, tokenizer, max_batch_tokens=64).score(REQUESTS)
    _assert_scores_equal(got, want)
    dense = LikelihoodScorer(model, tokenizer).score(REQUESTS)
    assert any(abs(d.logprob - g.logprob) > 1e-3 for d, g in zip(dense, got))


def test_encoding_follows_lm_eval_encode_pair():
    tokenizer = tiny_tokenizer()
    encoded = encode_request(tokenizer, Request("Sarah was ", "a surgeon"))
    # The trailing space moves to the continuation, and the continuation ids are the whole string's tail.
    assert list(encoded.context) == tokenizer.encode("Sarah was", add_special_tokens=False)
    whole = tokenizer.encode("Sarah was a surgeon", add_special_tokens=False)
    assert list(encoded.continuation) == whole[len(encoded.context):]
    with_bos = encode_request(tokenizer, Request("Sarah was ", "a surgeon"), add_bos=True)
    assert with_bos.context[0] == tokenizer.bos_token_id and with_bos.context[1:] == encoded.context


def test_empty_continuation_is_rejected():
    with pytest.raises(ValueError, match="empty continuation"):
        encode_request(tiny_tokenizer(), Request("context", ""))


def test_golden_numbers_on_fixed_weights():
    """Pinned under fixed seeds; a change here means scoring semantics changed, not just speed."""
    model, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    scores = LikelihoodScorer(model, tokenizer).score(REQUESTS[:2])
    assert [s.n_tokens for s in scores] == [GOLDEN_TOKENS[0], GOLDEN_TOKENS[1]]
    assert scores[0].logprob == pytest.approx(GOLDEN_LOGPROBS[0], abs=1e-4)
    assert scores[1].logprob == pytest.approx(GOLDEN_LOGPROBS[1], abs=1e-4)
    assert scores[0].mean_logprob == pytest.approx(GOLDEN_LOGPROBS[0] / GOLDEN_TOKENS[0], abs=1e-5)


GOLDEN_TOKENS = (13, 7)
GOLDEN_LOGPROBS = (-75.10995, -40.37930)


def test_parity_requests_exercise_both_shared_and_packed_paths():
    """Guards the parity tests above: they must cover context sharing (with and without a second pass) and packing."""
    tokenizer = tiny_tokenizer()
    scorer = LikelihoodScorer(tiny_model("llama"), tokenizer)
    encoded = [encode_request(tokenizer, r) for r in REQUESTS]
    shared, packed = scorer._split_by_shared_context(encoded)
    assert packed
    assert any(all(len(encoded[i].continuation) == 1 for i in g) for g in shared)
    assert any(any(len(encoded[i].continuation) > 1 for i in g) for g in shared)


def test_requests_longer_than_the_window_keep_their_last_tokens():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    long = Request("Question: " + "faucet water " * 30, " flowed from the spout " * 8)
    scorer = LikelihoodScorer(model, tokenizer, max_length=16)
    (score,) = scorer.score([long])
    assert score.n_tokens <= 16
    encoded = encode_request(tokenizer, long)
    whole = (encoded.context + encoded.continuation)[-17:]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, -score.n_tokens:]
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(whole[-score.n_tokens:])[:, None]).sum()
    assert score.logprob == pytest.approx(float(want), abs=1e-4)
