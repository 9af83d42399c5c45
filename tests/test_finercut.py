"""FinerCut on a tiny model: the criterion, the greedy search, its checkpoint, and the baselines artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.omit import omit_blocks, parse_omission
from pudding.core.score import LikelihoodScorer, Request
from pudding.evaluation.zero_shot import EvalConfig, evaluate
from pudding.pool.artifact import CandidatePool
from pudding.pool.evaluator import start_block
from pudding.pruning.candidates import PoolConfig, build_baselines
from pudding.pruning.finercut import (
    SUBBLOCK_FILE,
    DivergenceEvaluator,
    finercut_search,
    js_divergence,
    load_subblock_sets,
    sublayer_budget,
    sublayer_candidates,
)

from tiny import NUM_LAYERS, tiny_model, tiny_tokenizer, zeroed_reference

TEXTS = [
    "The man turned on the faucet. Water flowed from the spout because the valve opened.",
    "A revolving door is convenient for two direction travel, but it also serves as a security measure.",
    "How do I ready a guinea pig cage for its new occupants? Provide bedding made of paper strips.",
]
REQUESTS = [Request("", t) for t in TEXTS]


def _evaluator(model=None):
    return DivergenceEvaluator(LikelihoodScorer(model or tiny_model("llama"), tiny_tokenizer()), REQUESTS)


def test_js_divergence_is_zero_symmetric_and_bounded_by_ln2():
    p = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]]), dim=-1)
    q = torch.log_softmax(torch.tensor([[0.1, 1.5, -0.3], [3.0, -2.0, 0.0]]), dim=-1)
    torch.testing.assert_close(js_divergence(p, p), torch.zeros(2), atol=1e-7, rtol=0)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p))
    m = torch.log((p.exp() + q.exp()) / 2)
    by_hand = 0.5 * ((p.exp() * (p - m)).sum(-1) + (q.exp() * (q - m)).sum(-1))
    torch.testing.assert_close(js_divergence(p, q), by_hand)
    disjoint = js_divergence(torch.log(torch.tensor([1.0, 0.0])), torch.log(torch.tensor([0.0, 1.0])))
    assert float(disjoint) == pytest.approx(math.log(2))


def test_divergence_matches_an_independent_reference_model():
    model = tiny_model("llama")
    evaluator = _evaluator(model)
    dense, skipped = evaluator.evaluate([(), ["2.attn", "3.mlp"]])
    assert dense == pytest.approx(0.0, abs=1e-7)
    # The same divergence, from the zeroed-projection model run by hand on each text alone (no padding), at
    # every position that predicts a token of the text: BOS and the text, less its last token.
    reference, tokenizer, total, count = zeroed_reference(model, "2.attn,3.mlp"), tiny_tokenizer(), 0.0, 0
    for text in TEXTS:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)[:-1]]])
        with torch.no_grad():
            p = torch.log_softmax(model(ids).logits[0], dim=-1)
            q = torch.log_softmax(reference(ids).logits[0], dim=-1)
        total += float(js_divergence(p, q).sum())
        count += ids.shape[1]
    assert evaluator.n_tokens == count
    assert skipped == pytest.approx(total / count, rel=1e-4)
    assert skipped > 1e-6


def test_sets_sharing_removed_sub_layers_start_from_the_pass_without_them():
    # a greedy step's candidates: the removed {2.attn, 3} plus one sub-layer each, some in the removed blocks
    removed = ["2.attn", 3]
    sets = [[*removed, c] for c in ("1.attn", "1.mlp", "2.mlp", "4.attn", "4.mlp")]
    keys = [parse_omission(s, NUM_LAYERS).key for s in sets]
    # 2.attn and 2.mlp make block 2 whole, so what all five share is block 3
    assert [start_block(k, [3], NUM_LAYERS) for k in keys] == [1, 1, 2, 2, 2]
    assert [start_block(k, removed, NUM_LAYERS) for k in keys] == [1, 1, 2, 4, 4]
    assert start_block(parse_omission(removed, NUM_LAYERS).key, removed, NUM_LAYERS) is None
    evaluator = _evaluator()
    shared = evaluator.evaluate(sets)
    alone = [evaluator.evaluate([s])[0] for s in sets]  # alone, a set shares nothing: plain forwards
    assert shared == pytest.approx(alone, abs=1e-6) and min(shared) > 1e-6


def test_search_respects_barriers_picks_each_steps_minimum_and_is_deterministic():
    evaluator = _evaluator()
    result = finercut_search(evaluator, 4, barriers=(1, 1))
    assert len(result.removal_order) == 4 and len(set(result.removal_order)) == 4
    assert all(0 < int(r.split(".")[0]) < NUM_LAYERS - 1 for r in result.removal_order)
    candidates = sublayer_candidates(NUM_LAYERS, (1, 1))
    for i, step in enumerate(result.steps):
        assert len(step.candidate_losses) == len(candidates) - i
        assert step.loss == min(step.candidate_losses.values()) == step.candidate_losses[step.removed]
    assert result.trajectory[0] == 0.0 and result.trajectory[1:] == [s.loss for s in result.steps]
    again = finercut_search(_evaluator(), 4, barriers=(1, 1))
    assert again.removal_order == result.removal_order
    wide = finercut_search(_evaluator(), 2, barriers=(2, 2))
    assert all(int(r.split(".")[0]) in (2, 3) for r in wide.removal_order)
    with omit_blocks(evaluator.model, result.omission):  # the chosen set runs as an omission set
        pass


def test_search_resumes_from_its_checkpoint_and_refuses_another_identity(tmp_path, monkeypatch):
    checkpoint = tmp_path / "fc.json"
    first = finercut_search(_evaluator(), 2, checkpoint=checkpoint, identity={"a": 1})
    saved = json.loads(checkpoint.read_text())
    assert saved["format"] == "pudding.finercut-checkpoint/1" and len(saved["steps"]) == 2
    evaluator, calls = _evaluator(), []
    original = evaluator.evaluate
    monkeypatch.setattr(evaluator, "evaluate", lambda sets, **kw: calls.append(len(sets)) or original(sets, **kw))
    resumed = finercut_search(evaluator, 3, checkpoint=checkpoint, identity={"a": 1})
    candidates = len(sublayer_candidates(NUM_LAYERS, (1, 1)))
    assert calls == [candidates - 2], "only the new step may be evaluated"
    assert resumed.removal_order[:2] == first.removal_order
    assert resumed.removal_order == finercut_search(_evaluator(), 3).removal_order
    assert finercut_search(_evaluator(), 1, checkpoint=checkpoint, identity={"a": 1}).steps == resumed.steps[:1]
    with pytest.raises(ConfigError, match="differs in: a"):
        finercut_search(_evaluator(), 3, checkpoint=checkpoint, identity={"a": 2})
    checkpoint.write_text("{")
    with pytest.raises(ConfigError, match="corrupt"):
        finercut_search(_evaluator(), 3, checkpoint=checkpoint, identity={"a": 1})


@pytest.mark.parametrize("n", [0, 2 * (NUM_LAYERS - 2)])
def test_search_refuses_a_budget_outside_the_removable_sub_layers(n):
    with pytest.raises(ConfigError, match="removable sub-layers"):
        finercut_search(_evaluator(), n)
    with pytest.raises(ConfigError, match="positive"):
        sublayer_budget(0)


def test_baselines_store_finercut_beside_the_whole_block_pool_and_it_evaluates(tiny_dir, tmp_path, capsys):
    config = PoolConfig(model=tiny_dir, k=2, samples=4, run_dir=str(tmp_path / "run"), out=str(tmp_path / "out"),
                        progress=False)
    pool = build_baselines(config, ("sleb", "finercut"))
    assert [e.sources[0].method for e in pool.sets] == ["sleb"]
    assert [e.sources[0].method for e in CandidatePool.from_pretrained(tmp_path / "out").sets] == ["sleb"]
    (entry,) = load_subblock_sets(tmp_path / "out")
    assert entry.method == "finercut" and len(entry.removal_order) == sublayer_budget(2) == entry.budget["sublayers"]
    assert entry.budget["attn"] + entry.budget["mlp"] == 4
    state = tiny_model("llama").state_dict()
    size = {part: sum(v.numel() for k, v in state.items() if k.startswith(f"model.layers.1.{part}"))
            for part in ("self_attn.", "mlp.", "")}
    by_hand = (entry.budget["attn"] * size["self_attn."] + entry.budget["mlp"] * size["mlp."]) / size[""]
    assert entry.budget["block_equivalents"] == pytest.approx(by_hand, abs=1e-4)  # an MLP outweighs an attention
    assert (tmp_path / "run" / "finercut-js.json").is_file()
    model = tiny_model("llama")
    result = evaluate(EvalConfig(model="unused", tasks="piqa", omissions=("", entry.omit), limit=3, output_dir=None,
                                 progress=False), model=model, tokenizer=tiny_tokenizer())
    assert result["runs"][1]["label"] == f"omit {entry.omit}"
    status = main(["baselines", "--model", tiny_dir, "--methods", "finercut", "--k", "2", "--samples", "4",
                   "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "only"), "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0 and f"pudding eval --omit {entry.omit}" in out
    assert (tmp_path / "only" / SUBBLOCK_FILE).is_file() and not (tmp_path / "only" / "pool.json").exists()
    with pytest.raises(ConfigError, match="unknown baseline"):
        build_baselines(config, ("finecut",))
