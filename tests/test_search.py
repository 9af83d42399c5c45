"""Greedy block search: prefix reuse is exact, barriers hold, objectives match hand computation, and a
killed search resumes to the identical result."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.omit import check_k, omit_blocks, removable_blocks
from pudding.core.score import LikelihoodScorer, Request, score_one_by_one
from pudding.core.tasks import MCDoc
from pudding.pool.evaluator import CandidateEvaluator, start_block
from pudding.pruning.search import OBJECTIVES, get_objective, greedy_search

from tiny import NUM_LAYERS, tiny_model, tiny_tokenizer

DOCS = [
    MCDoc("t", "a", ("Question: Which technology was developed most recently?\nAnswer:",) * 3,
          (" cellular telephone", " television", " a"), 0,
          "Question: Which technology was developed most recently?\nAnswer:"),
    MCDoc("t", "b", ("The man turned on the faucet. Water flowed",) * 2,
          (" because the valve opened.", " from the spout"), 1, "The man turned on the faucet. Water flowed"),
    MCDoc("t", "c",
          ("Sarah was a much better surgeon than Maria so Sarah",
           "Sarah was a much better surgeon than Maria so Maria"),
          (" always got the easier cases.",) * 2, 1,
          "Sarah was a much better surgeon than Maria so _ always got the easier cases."),
]
REQUESTS = OBJECTIVES["margin"].requests(DOCS)


def _evaluator(model_type="llama", reuse=True, batch_tokens=48):
    scorer = LikelihoodScorer(tiny_model(model_type), tiny_tokenizer(), max_batch_tokens=batch_tokens)
    return CandidateEvaluator(scorer, REQUESTS, reuse_prefix=reuse)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt", "qwen2"])
def test_prefix_reuse_gives_the_same_scores_as_full_forwards(model_type):
    omissions = [(), (0,), (2,), (3, 4), (1, 5), (4, 5), (2, 3, 4, 5)]
    with_reuse = _evaluator(model_type, reuse=True).evaluate(omissions)
    model = tiny_model(model_type)
    for omitted, got in zip(omissions, with_reuse):
        with omit_blocks(model, omitted):
            want = score_one_by_one(model, tiny_tokenizer(), REQUESTS)
        assert [round(g.logprob, 4) for g in got] == pytest.approx([w.logprob for w in want], abs=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt", "qwen2"])
def test_a_greedy_steps_candidates_start_from_the_pass_without_the_removed_blocks(model_type):
    # every candidate is the removed blocks {2} plus one: each starts at its own block from the pass without 2
    omissions = [(1, 2), (2, 3), (2, 4), (2, 5), (2,), (2, 3, 4)]
    evaluator = _evaluator(model_type, reuse=True)
    starts = [start_block(o, (2,), evaluator.total_blocks) for o in omissions]
    assert starts == [1, 3, 4, None, None, 3]  # (2, 5): nothing after 5
    with_reuse = evaluator.evaluate(omissions)
    model = tiny_model(model_type)
    for omitted, got in zip(omissions, with_reuse):
        with omit_blocks(model, omitted):
            want = score_one_by_one(model, tiny_tokenizer(), REQUESTS)
        assert [round(g.logprob, 4) for g in got] == pytest.approx([w.logprob for w in want], abs=1e-4)
    exact = _evaluator(model_type, reuse=False).evaluate(omissions)
    assert [[s.logprob for s in scores] for scores in with_reuse] == [[s.logprob for s in scores] for scores in exact]


def test_a_greedy_step_saves_more_than_the_dense_prefix_would():
    # with block 1 removed, the dense prefix ends at block 1 for every candidate; the pass without block 1
    # lets candidate 4 skip blocks 0, 2 and 3 as well
    evaluator = _evaluator(batch_tokens=10_000)
    evaluator.evaluate([(1, 3), (1, 4)])
    rows = evaluator.batches[0].input_ids.shape[0]
    kept = NUM_LAYERS - 2
    # the shared pass runs blocks 0, 2, 3 (up to block 4's input); then (1, 3) runs 4, 5 and (1, 4) runs 5 of
    # their 4 kept blocks: 6 per row, where reusing only the dense prefix (block 0) runs 1 + 3 + 3 = 7
    assert evaluator.stats.blocks_run == rows * (3 + (kept - 2) + (kept - 3)) == rows * 6
    assert evaluator.stats.blocks_without_reuse == rows * 2 * kept


def test_a_pool_of_unrelated_sets_starts_each_from_the_earlier_set_it_agrees_with_longest():
    from pudding.pool.evaluator import BASE, plan_runs

    pool = [(), (1, 4), (1, 2), (3, 4), (1, 2, 4), (2, 3)]
    runs, base, _ = plan_runs(pool, NUM_LAYERS)
    assert base == () and [r.omitted for r in runs] == sorted(pool)
    starts = {r.omitted: (r.start, r.source if r.source in (None, BASE) else runs[r.source].omitted) for r in runs}
    assert starts[()] == (None, None)
    assert starts[(1, 2, 4)] == (4, (1, 2))  # agrees with (1, 2) on blocks 0-3: starts at 4, not at 1
    assert starts[(1, 4)] == (2, (1, 2))  # agrees with (1, 2) below block 2 (and with (1, 2, 4) below 2 too)
    assert starts[(3, 4)] == (3, BASE)  # nothing earlier agrees past block 3: the shared (here dense) pass


def test_random_pools_score_exactly_as_full_forwards_and_duplicates_once():
    rng = random.Random(0)
    model_types = ["llama", "gpt2"]
    for trial in range(6):
        evaluator = _evaluator(model_types[trial % 2], reuse=True)
        sets = [tuple(sorted(rng.sample(range(1, NUM_LAYERS - 1), rng.randint(0, 3)))) for _ in range(7)]
        if trial % 3 == 0:  # a greedy step's shape: a shared removed block plus one more each
            sets = [tuple(sorted({2, b})) for b in (1, 3, 4)] + sets[:2]
        sets.append(sets[0])  # listed twice: scored once, returned twice
        got = evaluator.evaluate(sets)
        want = _evaluator(model_types[trial % 2], reuse=False).evaluate(sets)
        assert [[x.logprob for x in row] for row in got] == [[x.logprob for x in row] for row in want], sets
        assert got[-1] == got[0]


def test_prefix_reuse_skips_work_and_counts_it():
    evaluator = _evaluator()
    evaluator.evaluate([(3,), (4,), (3, 4)])
    assert evaluator.stats.ratio > 1.3


@pytest.mark.parametrize("objective", ["tl", "margin", "choice-prob"])
def test_search_picks_identical_sets_with_and_without_reuse(objective):
    import dataclasses

    docs = [dataclasses.replace(d, task="piqa") for d in DOCS]  # choice-prob reads each task's metric
    loss = lambda scores: OBJECTIVES[objective].loss(docs, scores)  # noqa: E731
    requests = OBJECTIVES[objective].requests(docs)
    results = []
    for reuse in (True, False):
        scorer = LikelihoodScorer(tiny_model("llama"), tiny_tokenizer(), max_batch_tokens=48)
        results.append(greedy_search(CandidateEvaluator(scorer, requests, reuse_prefix=reuse), loss, k=3))
    assert results[0].removal_order == results[1].removal_order
    assert results[0].trajectory == pytest.approx(results[1].trajectory, abs=1e-4)


def test_each_step_removes_the_argmin_and_respects_barriers():
    evaluator = _evaluator()
    loss = lambda scores: OBJECTIVES["margin"].loss(DOCS, scores)  # noqa: E731
    result = greedy_search(evaluator, loss, k=3)
    assert 0 not in result.blocks and NUM_LAYERS - 1 not in result.blocks
    for step in result.steps:
        assert step.loss == min(step.candidate_losses.values())
        assert step.candidate_losses[step.removed] == step.loss
    assert sorted(result.steps[1].candidate_losses) == [b for b in range(1, NUM_LAYERS - 1)
                                                        if b != result.steps[0].removed]
    wide = greedy_search(_evaluator(), loss, k=2, barriers=(2, 0))
    assert not {0, 1} & set(wide.blocks)


def test_objective_losses_match_hand_computation():
    scores = score_one_by_one(tiny_model("llama"), tiny_tokenizer(), REQUESTS)
    gold = [scores[0], scores[4], scores[6]]  # gold of each doc in the flat choice list
    assert OBJECTIVES["tl"].loss(DOCS, gold) == pytest.approx(-sum(s.logprob / s.n_tokens for s in gold))
    means = [s.logprob / s.n_tokens for s in scores]
    want = -((means[0] - (means[1] + means[2]) / 2) + (means[4] - means[3]) + (means[6] - means[5]))
    assert OBJECTIVES["margin"].loss(DOCS, scores) == pytest.approx(want)
    assert OBJECTIVES["ppl"].loss(DOCS, scores) == pytest.approx(
        -sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores))
    assert OBJECTIVES["ppl"].requests([DOCS[0]]) == [Request("", DOCS[0].contexts[0])]


def test_choice_prob_loss_is_the_gold_log_softmax_under_each_tasks_metric():
    import dataclasses
    import math

    # doc a as an ARC-Easy question (acc: summed log-likelihoods), doc b as ARC-Challenge (acc_norm: per character)
    docs = [dataclasses.replace(DOCS[0], task="arc_easy"), dataclasses.replace(DOCS[1], task="arc_challenge")]
    scores = score_one_by_one(tiny_model("llama"), tiny_tokenizer(), OBJECTIVES["choice-prob"].requests(docs))
    summed = [s.logprob for s in scores[:3]]
    chars = docs[1].choice_chars  # lm-eval's divisor: the option without its leading space
    assert chars == (len("because the valve opened."), len("from the spout"))
    per_char = [s.logprob / n for s, n in zip(scores[3:], chars)]
    mean_chars = sum(chars) / 2

    def log_softmax_at(values, index):
        return values[index] - math.log(sum(math.exp(v) for v in values))

    want = -(log_softmax_at(summed, 0) + log_softmax_at([v * mean_chars for v in per_char], 1))
    assert OBJECTIVES["choice-prob"].loss(docs, scores) == pytest.approx(want)
    # it falls as the gold gains on the wrong choices and rises as it loses
    better = [dataclasses.replace(s, logprob=s.logprob + 1.0) if i == 0 else s for i, s in enumerate(scores)]
    worse = [dataclasses.replace(s, logprob=s.logprob - 1.0) if i == 0 else s for i, s in enumerate(scores)]
    assert OBJECTIVES["choice-prob"].loss(docs, better) < OBJECTIVES["choice-prob"].loss(docs, scores) \
        < OBJECTIVES["choice-prob"].loss(docs, worse)


def test_bad_k_and_unknown_objective():
    assert removable_blocks(30, (1, 1)) == list(range(1, 29))
    with pytest.raises(ConfigError, match="below the 28 removable"):
        check_k(28, 30, (1, 1))
    with pytest.raises(ConfigError, match="at least 1"):
        check_k(0, 30, (1, 1))
    with pytest.raises(UnknownNameError, match="known objectives: tl, margin, choice-prob, ppl"):
        get_objective("bleu")


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    loss = lambda scores: OBJECTIVES["tl"].loss(DOCS, scores)  # noqa: E731
    path = tmp_path / "ck.json"
    greedy_search(_evaluator(), loss, k=1, checkpoint=path, identity={"task": "t"})
    with pytest.raises(ConfigError, match="differs in: task"):
        greedy_search(_evaluator(), loss, k=2, checkpoint=path, identity={"task": "u"})
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        greedy_search(_evaluator(), loss, k=1, checkpoint=path, identity={"task": "t"})
    assert path.read_text() == "{not json", "a refused checkpoint must not be overwritten"


def test_a_checkpoint_extends_to_a_larger_k_and_answers_a_smaller_one(tmp_path):
    loss = lambda scores: OBJECTIVES["margin"].loss(DOCS, scores)  # noqa: E731
    fresh = greedy_search(_evaluator(), loss, k=3)
    path = tmp_path / "ck.json"
    greedy_search(_evaluator(), loss, k=1, checkpoint=path)
    extended = greedy_search(_evaluator(), loss, k=3, checkpoint=path)
    assert extended.removal_order == fresh.removal_order and extended.trajectory == fresh.trajectory
    shorter = greedy_search(_evaluator(), loss, k=2, checkpoint=path)
    assert shorter.removal_order == fresh.removal_order[:2]
    assert len(json.loads(path.read_text())["steps"]) == 3, "answering a smaller k must keep the longer search"


_CHILD = r"""
import sys, time, json
sys.path[:0] = [{tests!r}, {src!r}]
import pudding.pruning.search as search
from pudding.core.identity import StepCheckpoint
from test_search import DOCS, OBJECTIVES, _evaluator
original = StepCheckpoint.save
def slow_save(self):
    original(self)
    time.sleep(0.5)  # widen the window in which the parent kills us, between two steps
StepCheckpoint.save = slow_save
loss = lambda scores: OBJECTIVES["margin"].loss(DOCS, scores)
result = search.greedy_search(_evaluator(), loss, k=3, checkpoint={ck!r}, identity={{"task": "t"}})
print(json.dumps(result.removal_order))
"""


def test_search_killed_with_sigkill_resumes_to_the_identical_result(tmp_path):
    tests, src = str(Path(__file__).parent), str(Path(__file__).parents[1] / "src")
    loss = lambda scores: OBJECTIVES["margin"].loss(DOCS, scores)  # noqa: E731
    uninterrupted = greedy_search(_evaluator(), loss, k=3)
    checkpoint = tmp_path / "ck.json"
    code = _CHILD.format(tests=tests, src=src, ck=str(checkpoint))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        if checkpoint.exists() and len(json.loads(checkpoint.read_text())["steps"]) >= 1:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    steps_at_kill = len(json.loads(checkpoint.read_text())["steps"])
    assert 1 <= steps_at_kill < 3, "the child must be killed mid-search"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(finished.stdout.strip().splitlines()[-1]) == uninterrupted.removal_order
    assert len(json.loads(checkpoint.read_text())["steps"]) == 3


@pytest.mark.parametrize("method", ["shortened_ppl", "taylor", "shortgpt"])
def test_one_shot_baselines_rank_removable_blocks(method):
    from pudding.pruning.baselines import rank_blocks

    scorer = LikelihoodScorer(tiny_model("llama"), tiny_tokenizer(), max_batch_tokens=64)
    ranking = rank_blocks(method, scorer, OBJECTIVES["ppl"].requests(DOCS), k=2)
    assert sorted(ranking.importance) == list(range(1, NUM_LAYERS - 1))
    assert len(ranking.blocks) == 2 and set(ranking.blocks) <= set(ranking.importance)
    worst = sorted(ranking.importance, key=ranking.importance.get)[:2]
    assert set(ranking.blocks) == set(worst)
    assert all(v == v and v >= 0 for v in ranking.importance.values())  # finite, non-negative


def test_shortened_ppl_importance_equals_direct_perplexity():
    from pudding.pruning.baselines import shortened_ppl_importance

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    requests = OBJECTIVES["ppl"].requests(DOCS)
    importance = shortened_ppl_importance(LikelihoodScorer(model, tokenizer), requests, [2])
    with omit_blocks(model, [2]):
        scores = score_one_by_one(model, tokenizer, requests)
    assert importance[2] == pytest.approx(-sum(s.logprob for s in scores) / sum(s.n_tokens for s in scores), abs=1e-5)
