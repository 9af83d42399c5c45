"""The embedded SmolLM2-135M, end to end: a small smoke test by default, a fuller check under ``-m slow``."""

from __future__ import annotations

import pytest

from pudding.core.load import load_model
from pudding.core.metrics import aggregate
from pudding.core.omit import num_blocks, omit_blocks
from pudding.core.score import LikelihoodScorer, doc_requests, score_one_by_one
from pudding.core.tasks import load_docs
from pudding.evaluation.zero_shot import score_docs

pytestmark = pytest.mark.integration  # the real model: a few minutes on 2 cores, in the default run but for `slow`


@pytest.fixture(scope="module")
def smollm2():
    return load_model("default")


def test_default_model_loads_as_30_block_llama_with_pad_token(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and num_blocks(model) == 30
    assert model.config.hidden_size == 576 and not model.training
    assert tokenizer.pad_token_id is not None


def test_batched_scorer_matches_naive_loop_on_real_docs(smollm2):
    model, tokenizer = smollm2
    docs = load_docs("arc_easy", "calibration", limit=3) + load_docs("winogrande", "calibration", limit=2)
    requests = [r for doc in docs for r in doc_requests(doc)]
    for omitted in ((), (10, 20)):
        with omit_blocks(model, omitted):
            want = score_one_by_one(model, tokenizer, requests)
            got = LikelihoodScorer(model, tokenizer).score(requests)
        assert max(abs(a.logprob - b.logprob) for a, b in zip(got, want)) < 1e-3


def test_dense_piqa_is_above_chance_and_omission_hurts_it(smollm2):
    model, tokenizer = smollm2
    scorer = LikelihoodScorer(model, tokenizer)
    docs = load_docs("piqa", "evaluation", limit=40)
    dense = score_docs(scorer, docs)
    with omit_blocks(model, range(8, 26)):  # 18 of 30 blocks: far past what the model survives
        crippled = score_docs(scorer, docs)
    assert aggregate(dense, "acc").value > 0.55
    assert aggregate(crippled, "task_likelihood").value < aggregate(dense, "task_likelihood").value


@pytest.mark.slow
def test_piqa_accuracy_on_200_docs_is_near_the_known_0_64(smollm2):
    model, tokenizer = smollm2
    docs = load_docs("piqa", "evaluation", limit=200)
    value = aggregate(score_docs(LikelihoodScorer(model, tokenizer), docs), "acc").value
    assert 0.58 <= value <= 0.72


@pytest.mark.parametrize(("name", "k"), [("default", 6), ("default-k3", 3)])
def test_shipped_artifact_routes_and_generates(smollm2, name, k):
    """Each committed PuDDing artifact loads on a fresh machine, routes, and generates without its blocks."""
    from pudding.routing.model import PuddingModel

    model, tokenizer = smollm2
    pudding = PuddingModel.from_pretrained(name, model=model, tokenizer=tokenizer)
    assert pudding.pool.sets and all(len(e.blocks) == k for e in pudding.pool.sets)
    prompts = ["Question: Which gas do plants absorb from the air?\nAnswer:",
               "How do I get a stain out of a shirt?"]
    routes = pudding.route(prompts)
    assert all(r.blocks in {e.blocks for e in pudding.pool.sets} for r in routes)
    outputs = pudding.generate(prompts, max_new_tokens=4)
    assert [o.route for o in outputs] == routes and all(o.completion_tokens >= 1 for o in outputs)
    # routing again after a reload gives the same decisions
    assert PuddingModel.from_pretrained(name, model=model, tokenizer=tokenizer).route(prompts) == routes


def test_shipped_adaptive_artifact_chooses_depth_by_tolerance_and_the_fixed_ones_refuse_it(smollm2):
    """'default-adaptive' routes over a depth ladder: a huge tolerance puts every prompt at the deepest rung,
    tolerance 0 never goes deeper than that, and generation reports the tolerance; 'default' has one depth."""
    from pudding.core.errors import ConfigError
    from pudding.routing.model import PuddingModel

    model, tokenizer = smollm2
    pudding = PuddingModel.from_pretrained("default-adaptive", model=model, tokenizer=tokenizer)
    depths = sorted({e.k for e in pudding.pool.sets})
    assert depths == [0, 3, 6]
    prompts = ["Question: Which gas do plants absorb from the air?\nAnswer:", "Is the sun a star?"]
    deepest = pudding.route(prompts, tolerance=1e6)
    assert [len(r.blocks) for r in deepest] == [6, 6] and all(r.tolerance == 1e6 for r in deepest)
    dense = next(i for i, e in enumerate(pudding.pool.sets) if e.k == 0)
    for route in pudding.route(prompts, tolerance=0):  # the deepest set predicted at least as good as dense
        fits = [e.k for e, score in zip(pudding.pool.sets, route.scores) if score >= route.scores[dense] - 1e-6]
        assert len(route.blocks) == max(fits) and route.scores[route.set_index] >= route.scores[dense] - 1e-6
    outputs = pudding.generate(prompts, tolerance=1e6, max_new_tokens=2)
    assert [o.route for o in outputs] == deepest
    with pytest.raises(ConfigError, match="ladder|depth"):
        PuddingModel.from_pretrained("default", model=model, tokenizer=tokenizer).route(prompts, tolerance=0.1)


def test_default_model_exports_as_a_plain_checkpoint_that_matches(smollm2, tmp_path):
    """The GGUF-loaded default model exports (transformers refuses to save a GGUF-quantized model as is).

    The export is de-quantized fp32 safetensors that vanilla transformers loads, carrying no GGUF
    quantization config, and its logits equal in-library omission of the same blocks.
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from pudding.pruning.export import export_pruned

    model, tokenizer = smollm2
    omitted = (4, 12, 13, 20, 25, 27)
    out = export_pruned(model, tokenizer, omitted, tmp_path / "pruned", source="default")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 24
    assert model.hf_quantizer is not None and num_blocks(model) == 30  # the loaded model is left as it was
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer("Question: Which gas do plants absorb from the air?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad(), omit_blocks(model, omitted):
        expected = model(ids).logits
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)


def test_committed_search_checkpoints_keep_the_identity_the_current_code_computes(smollm2):
    """The medium run's TL searches (`pudding candidates --model default --k 6 --samples 128 --objectives tl`,
    checkpointed in results/smollm2/pool-128-run) resume under today's code only if it computes, field for
    field, the identity they recorded; a changed identity would restart hours of search."""
    import json
    from pathlib import Path

    from pudding.core.identity import identity_differences
    from pudding.core.load import model_fingerprint
    from pudding.pruning.candidates import PoolConfig, _search_identity, calibration_docs

    model, _ = smollm2
    config = PoolConfig(model="default", k=6, samples=128, objectives=("tl",))
    checkpoint = json.loads((Path(__file__).parents[1] / "results/smollm2/pool-128-run/arc_easy-tl.json").read_text())
    fingerprint = model_fingerprint(model.config)
    ours = _search_identity(config, fingerprint, "arc_easy", "tl", calibration_docs("arc_easy", 128))
    assert identity_differences(checkpoint["identity"], ours) == []
    assert json.dumps(ours) == json.dumps(checkpoint["identity"])  # same keys, same order, same values
    shorter = _search_identity(config, fingerprint, "arc_easy", "tl", calibration_docs("arc_easy", 127))
    assert identity_differences(checkpoint["identity"], shorter) == ["samples_sha256"]
