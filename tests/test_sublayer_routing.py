"""Sub-layer candidate sets end to end on a tiny llama: the evaluator scores them exactly, the budgeted greedy
search, the pool's /2 format, labels, a router choosing among them, generation, and the stages that refuse them."""

from __future__ import annotations

import json

import pytest
import torch
from test_search import DOCS, REQUESTS
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.core.omit import omit_blocks, parse_omission
from pudding.core.score import LikelihoodScorer, score_one_by_one
from pudding.evaluation.zero_shot import score_docs
from pudding.pool.artifact import POOL_FORMAT, SUBLAYER_POOL_FORMAT, CandidatePool, PoolEntry, SetSource, shrink_pool
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.candidates import PoolConfig, build_pool
from pudding.pruning.finercut import sublayer_costs
from pudding.pruning.search import OBJECTIVES, affordable, sublayer_search
from pudding.routing.labels import LabelConfig, Labels, build_labels, collect_docs
from pudding.routing.model import PuddingModel
from pudding.routing.train import TrainConfig, train_router

from tiny import NUM_LAYERS, VOCAB, tiny_model, tiny_tokenizer

TL = OBJECTIVES["tl"]


def _evaluator(reuse=True, model=None):
    scorer = LikelihoodScorer(model or tiny_model("llama"), tiny_tokenizer(), max_batch_tokens=48)
    return CandidateEvaluator(scorer, REQUESTS, reuse_prefix=reuse)


def _loss(scores):
    return TL.loss(DOCS, scores[:len(DOCS)]) if len(scores) == len(DOCS) else -sum(s.mean_logprob for s in scores)


def test_sub_layer_sets_score_exactly_as_full_forwards():
    # a greedy step's shape (a shared removed part plus one sub-layer each), a block made whole by two of its
    # sub-layers, and unrelated sets mixing whole blocks and sub-layers
    removed = ["2.attn", 4]
    sets = [parse_omission([*removed, c], NUM_LAYERS).key for c in ("1.attn", "1.mlp", "2.mlp", "3.attn", "5.mlp")]
    sets += [(1, "3.mlp"), ("4.attn",), (2, 3), (), ("1.mlp", "2.attn", 5)]
    got = _evaluator(reuse=True).evaluate(sets)
    model = tiny_model("llama")
    for omitted, row in zip(sets, got):
        with omit_blocks(model, omitted):
            want = score_one_by_one(model, tiny_tokenizer(), REQUESTS)
        assert [g.logprob for g in row] == pytest.approx([w.logprob for w in want], abs=1e-4), omitted
    assert got[0] != got[-1]


def test_costs_split_a_block_into_attention_and_mlp_shares():
    costs = sublayer_costs(tiny_model("llama"), (1, 1))
    assert list(costs) == [f"{b}.{n}" for b in range(1, NUM_LAYERS - 1) for n in ("attn", "mlp")]
    # tiny llama: attention q,o 32x32 + k,v 32x16 = 3,072; MLP 3 x 32x64 = 6,144; two norms of 32 per block
    assert costs["1.attn"] == pytest.approx(3072 / 9280, abs=1e-4)
    assert costs["1.mlp"] == pytest.approx(6144 / 9280, abs=1e-4)


def test_each_step_takes_the_affordable_minimum_and_the_set_fits_the_budget(tmp_path):
    costs = sublayer_costs(tiny_model("llama"), (1, 1))
    result = sublayer_search(_evaluator(), _loss, 1.5, costs, checkpoint=tmp_path / "c.json", identity={"x": 1})
    removed = []
    for step in result.steps:
        assert list(step.candidate_losses) == affordable(costs, removed, 1.5)
        assert step.removed == min(step.candidate_losses, key=step.candidate_losses.get)
        removed.append(step.removed)
    assert result.block_equivalents <= 1.5 and affordable(costs, removed, 1.5) == []
    assert min(costs.values()) > 1.5 - result.block_equivalents - 1e-9 or not affordable(costs, removed, 1.5)
    # the last step's loss is the chosen set's, scored by plain forwards of a fresh model
    model = tiny_model("llama")
    with omit_blocks(model, result.omission):
        assert _loss(score_one_by_one(model, tiny_tokenizer(), REQUESTS)) == pytest.approx(result.trajectory[-1],
                                                                                              abs=1e-3)


def test_the_sub_layer_search_resumes_and_refuses_another_budget(tmp_path):
    costs = sublayer_costs(tiny_model("llama"), (1, 1))
    checkpoint = tmp_path / "c.json"
    first = sublayer_search(_evaluator(), _loss, 1.0, costs, checkpoint=checkpoint, identity={"budget": 1.0})
    saved = json.loads(checkpoint.read_text())
    saved["steps"] = saved["steps"][:1]  # as if killed after its first step
    checkpoint.write_text(json.dumps(saved))
    again = sublayer_search(_evaluator(), _loss, 1.0, costs, checkpoint=checkpoint, identity={"budget": 1.0})
    assert again.removal_order == first.removal_order and again.steps[0].seconds == first.steps[0].seconds
    with pytest.raises(ConfigError, match="another model or configuration"):
        sublayer_search(_evaluator(), _loss, 2.0, costs, checkpoint=checkpoint, identity={"budget": 2.0})
    with pytest.raises(ConfigError, match="budget above 0"):
        sublayer_search(_evaluator(), _loss, 0.0, costs)


def _pool(sets) -> CandidatePool:
    fingerprint = model_fingerprint(tiny_model("llama").config)
    entries = tuple(PoolEntry(parse_omission(s, NUM_LAYERS).key, (SetSource("greedy", "piqa", "tl", list(s), [], [],
                                                                            0.0),)) for s in sets)
    return CandidatePool(entries, {"spec": "tiny", "name": "tiny", "fingerprint": fingerprint}, {"k": 1})


def test_a_pool_with_sub_layers_is_format_2_and_a_whole_block_pool_stays_format_1(tmp_path):
    mixed = _pool([["1.attn", "3.mlp"], [2], ["4.attn", "4.mlp"]])
    mixed.save_pretrained(tmp_path / "mixed")
    data = json.loads((tmp_path / "mixed" / "pool.json").read_text())
    assert data["format"] == SUBLAYER_POOL_FORMAT and data["sets"][2]["blocks"] == [4]
    loaded = CandidatePool.from_pretrained(tmp_path / "mixed")
    assert [e.blocks for e in loaded.sets] == [("1.attn", "3.mlp"), (2,), (4,)]
    assert loaded.fingerprint() == mixed.fingerprint() and [e.k for e in loaded.sets] == [1.0, 1, 1]
    _pool([[2], [3]]).save_pretrained(tmp_path / "whole")
    assert json.loads((tmp_path / "whole" / "pool.json").read_text())["format"] == POOL_FORMAT
    # a hand-edited set out of canonical order or naming a sub-layer that does not exist is refused on load
    for bad, message in ((["3.mlp", "1.attn"], "canonical"), (["1.norm"], "unknown sub-layer")):
        data["sets"][0]["blocks"] = bad
        (tmp_path / "mixed" / "pool.json").write_text(json.dumps(data))
        with pytest.raises(ConfigError, match=message):
            CandidatePool.from_pretrained(tmp_path / "mixed")
    with pytest.raises(ConfigError, match="cannot be shrunk"):
        shrink_pool(mixed, 1)


@pytest.fixture(scope="module")
def tiny_sublayer_pool(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sublayer")
    config = PoolConfig(model=tiny_dir, tasks=("piqa", "arc_easy"), objectives=("tl",), k=1, samples=4,
                        max_length=64, granularity="sublayer", run_dir=str(root / "run"), out=str(root / "pool"),
                        progress=False)
    return root, build_pool(config)


def test_candidates_cli_searches_sub_layers_within_the_budget(tiny_sublayer_pool, tiny_dir, tmp_path, capsys):
    root, pool = tiny_sublayer_pool
    costs = sublayer_costs(AutoModelForCausalLM.from_pretrained(tiny_dir), (1, 1))
    assert pool.has_sublayers and sorted((root / "run").iterdir()) == [root / "run" / "arc_easy-tl-sublayer.json",
                                                                      root / "run" / "piqa-tl-sublayer.json"]
    for entry in pool.sets:
        order = entry.sources[0].removal_order
        assert sum(costs[i] for i in order) <= 1.0 and parse_omission(order, NUM_LAYERS).key == entry.blocks
    # the CLI resumes the same searches from their checkpoints and writes the same pool
    status = main(["candidates", "--model", tiny_dir, "--tasks", "piqa,arc_easy", "--objectives", "tl", "--k", "1",
                   "--samples", "4", "--max-length", "64", "--granularity", "sublayer", "--run-dir",
                   str(root / "run"), "--out", str(tmp_path / "again"), "--no-progress"])
    assert status == 0 and CandidatePool.from_pretrained(tmp_path / "again").fingerprint() == pool.fingerprint()
    with pytest.raises(SystemExit):
        main(["candidates", "--model", tiny_dir, "--granularity", "layer", "--out", str(tmp_path / "x")])
    assert "invalid choice: 'layer'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def routed(tiny_sublayer_pool, tiny_dir, tmp_path_factory):
    """Labels under a pool of sub-layer sets and a router trained on them (tiny BERT backbone)."""
    root, _ = tiny_sublayer_pool
    # two searches on 4 documents may agree; a second, hand-made sub-layer set keeps the router's choice real
    pool = _pool([["1.attn", "3.mlp"], ["2.mlp"], ["4.attn"]])
    pool = CandidatePool(pool.sets, {**pool.model, "spec": tiny_dir}, {"k": 1})
    pool.save_pretrained(root / "routed-pool")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    build_labels(LabelConfig(pool=str(root / "routed-pool"), out=str(root / "labels"), tasks=("piqa", "arc_easy"),
                             samples=8, shard_size=5, run_dir=str(root / "label-run"), progress=False),
                 model=model, tokenizer=tokenizer)
    backbone = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    out = root / "artifact"
    pudding = train_router(TrainConfig(labels=str(root / "labels"), pool=str(root / "routed-pool"), out=str(out),
                                       router="embed-mlp", backbone=str(backbone), epochs=2, hidden=16,
                                       val_fraction=0.25, progress=False), model=model, tokenizer=tokenizer)
    return root, out, pudding, model, tokenizer


def test_labels_under_sub_layer_sets_equal_direct_scoring(routed):
    root, _, _, model, tokenizer = routed
    labels = Labels.load(root / "labels")
    pool = CandidatePool.from_pretrained(root / "routed-pool")
    assert [tuple(s) for s in labels.meta["sets"]] == [e.blocks for e in pool.sets]
    docs = collect_docs(LabelConfig(pool=str(root / "routed-pool"), out=str(root / "labels"),
                                    tasks=("piqa", "arc_easy"), samples=8))
    assert labels.table["doc_id"] == [d.doc_id for d in docs]
    for column, entry in enumerate(pool.sets):
        with omit_blocks(model, entry.blocks):
            direct = score_docs(LikelihoodScorer(model, tokenizer), docs)
        for row, doc in zip(labels.table, direct):
            assert row["label"][column] == pytest.approx(doc.choices[doc.gold].mean_logprob, abs=1e-4), entry.blocks


def test_a_routed_sub_layer_set_generates_what_omit_blocks_generates(routed):
    _, out, _, model, tokenizer = routed
    pudding = PuddingModel.from_pretrained(out, model=model, tokenizer=tokenizer)
    prompts = ["Question: Which gas do plants absorb?\nAnswer:", "How do I boil an egg?"]
    routes = pudding.route(prompts)
    texts = [g.text for g in pudding.generate(prompts, max_new_tokens=6, routes=routes)]
    for prompt, route, text in zip(prompts, routes, texts):
        assert route.blocks in [e.blocks for e in pudding.pool.sets]
        assert [g.text for g in pudding.generate([prompt], max_new_tokens=6, routes=[route])] == [text]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with omit_blocks(model, route.blocks), torch.no_grad():
            want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert text == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_stages_that_need_whole_blocks_refuse_a_sub_layer_artifact_in_one_line(routed, tmp_path, capsys):
    _, out, _, _, _ = routed
    status = main(["export", "--model", str(out), "--all-sets", "--out", str(tmp_path / "export")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert status != 0 and "pudding export (set 0, " in last and "takes whole blocks only" in last
    assert not (tmp_path / "export" / "set-0").exists()
    status = main(["heal", "--pool", str(out), "--out", str(tmp_path / "healed"), "--steps", "1", "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status != 0 and "pudding heal (set 0, " in last and "takes whole blocks only" in last


def test_the_benchmark_compares_routers_over_both_pools_on_the_same_documents(tiny_dir, tmp_path, capsys):
    import sys
    from pathlib import Path

    from pudding.pruning.finercut import SubBlockSet, save_subblock_sets

    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import sublayer_routing

    model = {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(tiny_model("llama").config)}

    def save(name, sets, method="greedy"):
        entries = tuple(PoolEntry(parse_omission(s, NUM_LAYERS).key,
                                  (SetSource(method, task, objective, list(s), [], [], 0.0),))
                        for s, task, objective in sets)
        CandidatePool(entries, model, {"k": 1}).save_pretrained(tmp_path / name)

    # the margin search's set is not a TL set: it stays out of the comparison
    save("block", [([2], "piqa", "tl"), ([3], "piqa", "margin"), ([4], "arc_easy", "tl")])
    save("sub", [(["1.attn", "3.mlp"], "piqa", "tl"), (["4.attn"], "arc_easy", "tl")])
    baselines = (PoolEntry((3,), (SetSource("sleb", None, "ppl", [3], [], [], 0.0),)),
                 PoolEntry((1,), (SetSource("shortgpt", None, None, [1], [], [], 0.0),)))
    CandidatePool(baselines, model, {"k": 1}).save_pretrained(tmp_path / "baselines")
    backbone = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    save_subblock_sets(tmp_path / "finercut", [SubBlockSet("finercut", "2.attn,3.attn", ["2.attn", "3.attn"],
                                                           [0.0, 0.1, 0.2], {"sublayers": 2}, [], 1.0)], model, {})
    status = sublayer_routing.main([
        "--block-pool", str(tmp_path / "block"), "--sublayer-pool", str(tmp_path / "sub"), "--baselines",
        str(tmp_path / "baselines"), "--finercut", str(tmp_path / "finercut"), "--k", "1", "--calibration-samples",
        "6", "--eval-samples", "3", "--seeds", "2", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
        "--backbone", str(backbone), "--epochs", "3", "--no-progress"])
    assert status == 0
    report = json.loads((tmp_path / "out" / "sublayer-routing.json").read_text())
    rows = report["table"]["rows"]
    assert report["n_eval"] == 18 and report["n_calibration"] == 36
    assert {"dense", "SLEB", "FinerCut (2 sub-layers)", "PuDDing over sub-layers (mean of 2 seeds)",
            "PuDDing over whole blocks (mean of 2 seeds)", "PuDDing over both (mean of 2 seeds)"} <= set(rows)
    assert [s["blocks"] for s in report["pools"]["whole blocks"]["sets"]] == [[2], [4]]
    assert report["block_equivalents"]["dense"] == 0 and report["block_equivalents"]["SLEB"] == pytest.approx(1.0)
    # every baseline is a row, and so is the best single set at the budget, picked on calibration accuracy from
    # the baselines' and both pools' sets (never dense or FinerCut)
    best = "best static set (chosen on calibration accuracy)"
    assert {"ShortGPT", best} <= set(rows) and 0 < report["block_equivalents"][best] <= 1 + 1e-9
    assert report["pools"]["best static set"] in ([3], [1], [2], [4], ["1.attn", "3.mlp"], ["4.attn"])
    assert {f"PuDDing over {name} (mean of 2 seeds) minus {other}" for name in ("whole blocks", "sub-layers")
            for other in ("SLEB", "ShortGPT", best, "dense")} <= set(report["paired"])
    routed = report["block_equivalents"]["PuDDing over sub-layers (mean of 2 seeds)"]
    assert 0 < routed < 1  # every sub-layer set here is less than a block
    # every routed document's correctness is one of its pool's sets' on that document
    for name in ("whole blocks", "sub-layers"):
        assert sum(report["pools"][name]["choice_shares"].values()) == pytest.approx(1.0)
        seeds = report["pools"][name]["seed_averages"]  # the row averages its seeds' documents: the same mean
        assert sum(seeds) / 2 == pytest.approx(rows[f"PuDDing over {name} (mean of 2 seeds)"]["average"], abs=1e-4)
    assert (tmp_path / "out" / "sublayer-routing.png").stat().st_size > 1000
    # a rerun resumes every stage (scores and routers) and writes the same table
    sublayer_routing.main(["--block-pool", str(tmp_path / "block"), "--sublayer-pool",
                           str(tmp_path / "sub"), "--baselines", str(tmp_path / "baselines"), "--finercut",
                           str(tmp_path / "finercut"), "--k", "1", "--calibration-samples", "6", "--eval-samples",
                           "3", "--seeds", "2", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "again"),
                           "--backbone", str(backbone), "--epochs", "3", "--no-progress"])
    again = json.loads((tmp_path / "again" / "sublayer-routing.json").read_text())
    assert again["table"] == report["table"]


def test_a_sub_layer_search_is_refused_where_it_cannot_run(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="local executor only"):
        PoolConfig(model=tiny_dir, granularity="sublayer", executor="ray", out=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="unknown granularity"):
        PoolConfig(model=tiny_dir, granularity="sub-layer", out=str(tmp_path / "x"))
    from pudding.pruning.candidates import build_baselines

    with pytest.raises(ConfigError, match="--methods finercut"):
        build_baselines(PoolConfig(model=tiny_dir, granularity="sublayer", out=str(tmp_path / "x")))
