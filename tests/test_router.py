"""Labels, routers and the PuDDing model on a tiny llama (6 blocks) and a tiny BERT router backbone."""

import hashlib
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

import pudding.routing.labels
from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.core.omit import omit_blocks
from pudding.core.score import LikelihoodScorer
from pudding.evaluation.zero_shot import score_docs
from pudding.pool.artifact import CONFIG_FILE, CandidatePool, PoolEntry, SetSource
from pudding.routing.labels import LABELS_FILE, LabelConfig, Labels, build_labels, collect_docs
from pudding.routing.model import ROUTER_FILE, PuddingModel, Route
from pudding.routing.router import RouterConfig, build_router, choose_sets
from pudding.routing.train import (
    RoutingData,
    TrainConfig,
    fit,
    frozen_features,
    is_validation,
    label_targets,
    routing_data,
    routing_quality,
    split_rows,
    train_router,
    tune_switch,
)

from tiny import VOCAB, tiny_model, tiny_tokenizer

SETS = [(1, 2), (2, 3), (3, 4), (1, 4)]
TASKS = ("piqa", "arc_easy")


def make_pool(model, spec: str, sets=SETS) -> CandidatePool:
    entries = tuple(PoolEntry(s, (SetSource("greedy", "piqa", "tl", list(s), [], [], 0.0),)) for s in sets)
    return CandidatePool(entries, {"spec": spec, "name": "tiny", "fingerprint": model_fingerprint(model.config)})


@pytest.fixture(scope="module")
def llm(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny random BERT with the tiny tokenizer: stands in for MiniLM as the router backbone."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_dir, llm):
    root = tmp_path_factory.mktemp("labelled")
    pool = make_pool(llm[0], tiny_dir)
    pool.save_pretrained(root / "pool")
    config = LabelConfig(pool=str(root / "pool"), out=str(root / "labels"), tasks=TASKS, samples=12,
                         shard_size=5, run_dir=str(root / "run"), progress=False)
    build_labels(config, model=llm[0], tokenizer=llm[1])
    return root, config


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- labels ------------------------------------------------------------------------------------------------


def test_labels_equal_direct_scoring_under_each_set(labelled, llm):
    root, config = labelled
    labels = Labels.load(root / "labels")
    docs = collect_docs(config)
    assert len(labels.table) == len(docs) == 24 and labels.n_sets == len(SETS)
    assert labels.table["doc_id"] == [d.doc_id for d in docs]
    scorer = LikelihoodScorer(*llm, max_length=config.max_length)
    for s, blocks in enumerate(SETS):
        with omit_blocks(llm[0], blocks):
            direct = score_docs(scorer, docs)
        for row, doc in zip(labels.table, direct):
            assert row["label"][s] == pytest.approx(doc.choices[doc.gold].mean_logprob, abs=1e-4)
            assert row["choice_logprob"][s] == pytest.approx([c.logprob for c in doc.choices], abs=1e-4)


def test_killed_labelling_resumes_to_the_identical_file(labelled, tmp_path, llm):
    root, config = labelled
    crashed = LabelConfig(**{**config.__dict__, "out": str(tmp_path / "out"), "run_dir": str(tmp_path / "run")})

    def crash(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_labels(crashed, model=llm[0], tokenizer=llm[1], on_shard=crash)
    assert len(list((tmp_path / "run").glob("shard-*/set-*.parquet"))) == 2 * len(SETS)
    assert not (tmp_path / "out").exists()
    build_labels(crashed, model=llm[0], tokenizer=llm[1])
    assert _sha(tmp_path / "out" / LABELS_FILE) == _sha(root / "labels" / LABELS_FILE)


def test_a_resume_with_another_shard_size_is_refused_not_short(labelled, tmp_path, llm):
    root, config = labelled
    first = LabelConfig(**{**config.__dict__, "out": str(tmp_path / "out"), "run_dir": str(tmp_path / "run")})

    def crash(index):
        if index == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_labels(first, model=llm[0], tokenizer=llm[1], on_shard=crash)
    with pytest.raises(ConfigError, match="differs in: shard_size"):
        build_labels(LabelConfig(**{**first.__dict__, "shard_size": 4}), model=llm[0], tokenizer=llm[1])
    assert not (tmp_path / "out").exists()


def test_a_second_pool_scores_only_its_new_sets_and_equals_a_fresh_run(labelled, tmp_path, llm, tiny_dir):
    root, config = labelled
    wider = [*SETS[:2], (2, 4), (1, 3)]
    make_pool(llm[0], tiny_dir, wider).save_pretrained(tmp_path / "wider")
    scored = []
    original = pudding.routing.labels.score_sets

    def counting(scorer, docs, sets, reuse_prefix=True):
        scored.extend(sets)
        return original(scorer, docs, sets, reuse_prefix)

    shared_run = LabelConfig(**{**config.__dict__, "pool": str(tmp_path / "wider"), "out": str(tmp_path / "shared")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pudding.routing.labels, "score_sets", counting)
        build_labels(shared_run, model=llm[0], tokenizer=llm[1])
    assert set(scored) == {(2, 4), (1, 3)}, "sets already in the run directory were scored again"
    fresh = LabelConfig(**{**shared_run.__dict__, "out": str(tmp_path / "fresh"), "run_dir": str(tmp_path / "run2")})
    build_labels(fresh, model=llm[0], tokenizer=llm[1])
    assert _sha(tmp_path / "shared" / LABELS_FILE) == _sha(tmp_path / "fresh" / LABELS_FILE)


def test_labelling_refuses_a_pool_of_another_model_and_a_foreign_run_dir(labelled, tmp_path, llm, tiny_dir):
    root, config = labelled
    other = make_pool(tiny_model("llama", num_hidden_layers=8), tiny_dir)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="built for"):
        build_labels(LabelConfig(**{**config.__dict__, "pool": str(tmp_path / "other")}),
                     model=llm[0], tokenizer=llm[1])
    with pytest.raises(ConfigError, match="another labelling job"):
        build_labels(LabelConfig(**{**config.__dict__, "samples": 3}), model=llm[0], tokenizer=llm[1])


def test_corrupt_label_file_is_refused(labelled, tmp_path):
    root, _ = labelled
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "labels.json").write_text((root / "labels" / "labels.json").read_text())
    (broken / LABELS_FILE).write_bytes((root / "labels" / LABELS_FILE).read_bytes()[:200])
    with pytest.raises(ConfigError, match="not a readable label file"):
        Labels.load(broken)


def test_train_validation_split_is_by_question():
    texts = ["What is 2+2?", "what is  2+2?", "Name a bird."] * 10
    train, val = split_rows(texts, 0.5)
    normal = lambda t: " ".join(t.split()).lower()  # noqa: E731
    assert not {normal(texts[i]) for i in train} & {normal(texts[i]) for i in val}
    assert is_validation("What is 2+2?", 0.5) == is_validation("what is 2+2?", 0.5)


# --- routers and the artifact ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["embed-mlp", "encoder", "llm-embed", "task"])
def trained(request, labelled, llm, encoder_dir, tmp_path_factory):
    root, _ = labelled
    out = tmp_path_factory.mktemp(f"artifact-{request.param}")
    config = TrainConfig(labels=str(root / "labels"), pool=str(root / "pool"), out=str(out), router=request.param,
                         backbone=encoder_dir, epochs=3, hidden=16, val_fraction=0.4, progress=False)
    return out, train_router(config, model=llm[0], tokenizer=llm[1])


def test_training_writes_history_and_quality(trained):
    out, pudding = trained
    history = json.loads((out / "training.json").read_text())
    assert [r["epoch"] for r in history["history"]] == [1, 2, 3]
    # the recorded best epoch is the one with the lowest validation loss, and its quality is the one reported
    best = min(history["history"], key=lambda r: r["val_loss"])
    assert history["best_epoch"] == best["epoch"] and history["val"] == best["val"]
    assert (out / "training.png").stat().st_size > 1000
    assert history["n_train"] + history["n_val"] == 24


def test_the_recorded_validation_quality_is_what_the_saved_router_does(trained, labelled, llm):
    """training.json's ``val`` block is recomputed from outside: the reloaded artifact routes the validation
    prompts (the same split, rebuilt from the prompts' text) and its choices are scored against the labels."""
    root, _ = labelled
    out, _ = trained
    history = json.loads((out / "training.json").read_text())
    pool = CandidatePool.from_pretrained(str(root / "pool"))
    data = routing_data(Labels.load(str(root / "labels")).for_pool(pool), history["config"]["target"])
    _, val = split_rows(data.texts, history["config"]["val_fraction"])
    reloaded = PuddingModel.from_pretrained(str(out), model=llm[0], tokenizer=llm[1])
    chosen = torch.tensor([r.set_index for r in reloaded.route([data.texts[i] for i in val])])
    assert history["val"] == pytest.approx(routing_quality(chosen, data.subset(val), history["static_set"]))
    assert history["val"]["n"] == len(val) and history["n_val"] == len(val)


def test_training_is_reproducible_whatever_ran_before(trained, labelled, llm, encoder_dir, tmp_path):
    from safetensors.torch import load_file

    out, pudding = trained
    config = TrainConfig(**{**json.loads((out / "training.json").read_text())["config"], "out": str(tmp_path)})
    torch.rand(7)  # the global generator is no longer where it was when the fixture trained
    train_router(config, model=llm[0], tokenizer=llm[1])
    first, again = load_file(out / "router.safetensors"), load_file(tmp_path / "router.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_the_task_router_sends_each_task_to_its_best_set_on_the_training_prompts(encoder_dir):
    """Per-prompt labels are noise around each task's own best set; the task router, told only which task each
    training prompt is from, routes held-out prompts of a task to that task's best set."""
    generator = torch.Generator().manual_seed(0)
    questions = [f"Question: Which of {w} is a gas?\nAnswer:" for w in ("these", "those", "the two", "all", "water")]
    goals = [f"How do I {w} a chair?" for w in ("paint", "fix", "clean", "move", "sand")]
    texts = [f"{q} ({i})" for i in range(8) for q in questions] + [f"{g} ({i})" for i in range(8) for g in goals]
    tasks = ["arc_easy"] * 40 + ["piqa"] * 40
    best = {"arc_easy": 2, "piqa": 0}
    mean = torch.tensor([[0.0, 0.0, 1.0, 0.0] if t == "arc_easy" else [1.0, 0.0, 0.0, 0.0] for t in tasks])
    labels = (mean + 1.5 * torch.randn(80, 4, generator=generator)).double()  # noise swamps the per-prompt argmax
    data = RoutingData(texts, labels, labels.gt(labels.median()).double(), tasks)
    train, val = list(range(0, 80, 2)), list(range(1, 80, 2))
    assert (labels[val].argmax(1) != torch.tensor([best[tasks[i]] for i in val])).sum() > 10
    config = RouterConfig("task", 4, encoder_dir, max_length=32, tasks=("arc_easy", "piqa"))
    torch.manual_seed(0)
    router = build_router(config)
    result = fit(router, data, train, val, TrainConfig(labels="-", pool="-", out="-", router="task", lr=1e-2,
                                                        epochs=40, progress=False))
    chosen = router.choose(router.scores([texts[i] for i in val]))
    assert chosen.tolist() == [best[tasks[i]] for i in val]
    assert result["history"][-1]["val_loss"] < result["history"][0]["val_loss"]  # it learnt the tasks


def test_routers_on_one_frozen_encoder_share_its_features_and_score_exactly_as_alone(encoder_dir):
    texts = [f"Question: What is {i} plus {i}?\nAnswer:" for i in range(70)]  # two batches of 64 and 6
    torch.manual_seed(0)
    first, second = (build_router(RouterConfig("embed-mlp", 3, encoder_dir, hidden=8)) for _ in range(2))
    features = frozen_features(first, texts)
    assert frozen_features(second, texts) is features  # encoded once for both
    for router in (first, second):
        assert torch.equal(router.scores(texts, features=features), router.scores(texts))
    assert not torch.equal(first.scores(texts, features=features), second.scores(texts, features=features))
    assert frozen_features(build_router(RouterConfig("encoder", 3, encoder_dir)), texts) is None  # fine-tuned


def test_the_task_router_needs_tasks_and_the_mse_loss():
    for call, message in [
        (lambda: TrainConfig(labels="-", pool="-", out="-", router="task", loss="ce"), "--loss mse"),
        (lambda: RouterConfig("task", 4), "needs its calibration tasks"),
        (lambda: RouterConfig("embed-mlp", 4, tasks=("piqa",)), "needs its calibration tasks"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


def test_artifact_round_trip_keeps_routes_and_writes_no_llm_weights(trained, llm):
    from safetensors import safe_open

    out, pudding = trained
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([CONFIG_FILE, "pool.json", ROUTER_FILE, "training.json", "training.png"])
    with safe_open(str(out / ROUTER_FILE), "pt") as handle:
        keys = list(handle.keys())
    llm_keys = set(llm[0].state_dict())
    assert not llm_keys & set(keys) and not any(k.startswith("_embedding") for k in keys)
    if pudding.router.kind == "encoder":
        assert any(k.startswith("encoder.") for k in keys)
    else:
        assert all(k.startswith("head.") for k in keys)
    prompts = ["Question: Which gas do plants absorb?\nAnswer:", "How do I boil an egg?", "The cat sat on"]
    before = pudding.route(prompts)
    reloaded = PuddingModel.from_pretrained(out, model=llm[0], tokenizer=llm[1])
    assert reloaded.route(prompts) == before
    assert all(r.blocks in SETS and r.scores[r.set_index] == max(r.scores) for r in before)


def test_loading_refuses_another_model_and_a_truncated_router(trained, tmp_path, tiny_dir):
    import shutil

    out, pudding = trained
    other = tiny_model("llama", seed=1, num_hidden_layers=8)
    with pytest.raises(ConfigError, match="Refusing"):
        PuddingModel.from_pretrained(out, model=other, tokenizer=tiny_tokenizer())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = (copy / ROUTER_FILE).read_bytes()
    (copy / ROUTER_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="safetensors"):
        PuddingModel.from_pretrained(copy, model=pudding.model, tokenizer=pudding.tokenizer)


def test_config_from_a_newer_version_warns(trained, tmp_path):
    import shutil

    out, pudding = trained
    copy = tmp_path / "newer"
    shutil.copytree(out, copy)
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["version"], config["shiny_new_feature"] = 2, {"x": 1}
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="newer pudding"):
        reloaded = PuddingModel.from_pretrained(copy, model=pudding.model, tokenizer=pudding.tokenizer)
    assert reloaded.route(["a prompt"]) == pudding.route(["a prompt"])


@pytest.mark.parametrize("blocks, problem", [
    ([1, 1], "more than once"),
    ([-1, 2], "out of range"),
    ([1, 6], "out of range"),  # the tiny model has blocks 0..5
    ([1.5, 2], "integer"),
    (["1", 2], "integer"),
    ([True, 2], "integer"),
    ("1,2", "list"),
])
def test_a_pool_with_invalid_blocks_is_refused_when_loaded(blocks, problem, llm, tiny_dir, tmp_path):
    path = make_pool(llm[0], tiny_dir).save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    data["sets"][2]["blocks"] = blocks
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"set 2 \(piqa-tl\).*{problem}"):
        CandidatePool.from_pretrained(tmp_path)


def test_a_pool_whose_model_has_no_block_count_still_gets_its_blocks_checked(llm, tiny_dir, tmp_path):
    path = make_pool(llm[0], tiny_dir).save_pretrained(tmp_path)
    data = json.loads(path.read_text())
    del data["model"]["fingerprint"]
    data["sets"][0]["blocks"] = [-3]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"set 0 .*non-negative"):
        CandidatePool.from_pretrained(tmp_path)


def test_the_artifact_records_its_pool_and_refuses_a_reordered_one(trained, tmp_path):
    import shutil

    out, pudding = trained
    assert json.loads((out / CONFIG_FILE).read_text())["pool_fingerprint"] == pudding.pool.fingerprint()
    copy = tmp_path / "reordered"
    shutil.copytree(out, copy)
    pool = json.loads((copy / "pool.json").read_text())
    pool["sets"].reverse()  # still a valid pool of the same model, but set i is no longer the router's output i
    (copy / "pool.json").write_text(json.dumps(pool))
    with pytest.raises(ConfigError, match="pool.json does not match the pool the router was trained on"):
        PuddingModel.from_pretrained(copy, model=pudding.model, tokenizer=pudding.tokenizer)


def test_an_artifact_from_before_the_pool_fingerprint_loads_with_a_warning(trained, tmp_path):
    import shutil

    out, pudding = trained
    copy = tmp_path / "older"
    shutil.copytree(out, copy)
    config = json.loads((copy / CONFIG_FILE).read_text())
    del config["pool_fingerprint"]
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no pool fingerprint"):
        reloaded = PuddingModel.from_pretrained(copy, model=pudding.model, tokenizer=pudding.tokenizer)
    assert reloaded.route(["a prompt"]) == pudding.route(["a prompt"])


def test_train_router_refuses_labels_of_another_pool(labelled, llm, tmp_path, tiny_dir):
    root, _ = labelled
    make_pool(llm[0], tiny_dir, sets=[(1, 2), (2, 5)]).save_pretrained(tmp_path / "pool2")
    with pytest.raises(ConfigError, match=r"sets \[\[2, 5\]\] were not labelled"):
        train_router(TrainConfig(labels=str(root / "labels"), pool=str(tmp_path / "pool2"), out=str(tmp_path / "x"),
                                 progress=False), model=llm[0], tokenizer=llm[1])
    other = make_pool(tiny_model("llama", num_hidden_layers=8), tiny_dir, sets=[(1, 2), (2, 3)])
    with pytest.raises(ConfigError, match="another model"):
        Labels.load(root / "labels").for_pool(other)
    assert not (tmp_path / "x").exists()


def test_routing_data_marks_correct_sets(labelled):
    root, _ = labelled
    data = routing_data(Labels.load(root / "labels"))
    assert data.labels.shape == data.correct.shape == (24, len(SETS))
    assert set(data.correct.unique().tolist()) <= {0.0, 1.0}


def test_label_targets_follow_the_metric_not_the_token_mean():
    # Two choices under one set. acc: summed log-likelihoods -3 (gold) vs -4, so the set is right by 1 nat.
    assert label_targets([[-3.0, -4.0]], [3, 9], 0, "acc", [-1.5], "margin") == [pytest.approx(1.0)]
    assert label_targets([[-3.0, -4.0]], [3, 9], 0, "acc", [-1.5], "choice-prob") == [
        pytest.approx(math.exp(-3) / (math.exp(-3) + math.exp(-4)))]
    assert label_targets([[-3.0, -4.0]], [3, 9], 0, "acc", [-1.5], "tl") == [-1.5]
    # acc_norm: per character (rescaled by the mean length, 6): -1 vs -4/9, so the gold loses.
    margin = label_targets([[-3.0, -4.0]], [3, 9], 0, "acc_norm", [-1.5], "margin")[0]
    assert margin == pytest.approx((-3 / 3 + 4 / 9) * 6) and margin < 0
    # the margin is positive exactly where the set answers correctly
    assert (label_targets([[-2.0, -1.0, -5.0]], [1, 1, 1], 2, "acc", [0.0], "margin")[0] > 0) is False


def test_safe_routing_keeps_the_default_unless_the_gain_clears_the_threshold():
    scores = torch.tensor([[0.0, 0.5, 0.1], [0.0, 2.0, 0.1], [0.3, 0.1, 0.2]])
    assert choose_sets(scores).tolist() == [1, 1, 0]
    assert choose_sets(scores, default_set=2, threshold=1.0).tolist() == [2, 1, 2]
    # Tuning: set 1 is right on the second prompt only, the default (2) on the others.
    correct = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    threshold, stats = tune_switch(scores, correct, default=2)
    assert choose_sets(scores, 2, threshold).tolist() == [2, 1, 2]
    assert stats["acc_safe"] == 1.0 and stats["acc_argmax"] == pytest.approx(1 / 3)
    assert stats["switch_rate"] == pytest.approx(1 / 3)


def test_labels_of_a_wider_pool_train_a_router_on_a_narrower_one(labelled, llm, tiny_dir, tmp_path):
    root, _ = labelled
    labels = Labels.load(root / "labels")
    narrow = make_pool(llm[0], tiny_dir, [SETS[2], SETS[0]])
    restricted = labels.for_pool(narrow)
    assert restricted.meta["sets"] == [list(SETS[2]), list(SETS[0])]
    assert [row[0] for row in restricted.table["label"]] == [row[2] for row in labels.table["label"]]
    with pytest.raises(ConfigError, match="were not labelled"):
        labels.for_pool(make_pool(llm[0], tiny_dir, [SETS[0], (2, 5)]))
    narrow.save_pretrained(tmp_path / "narrow")
    pudding = train_router(TrainConfig(labels=str(root / "labels"), pool=str(tmp_path / "narrow"),
                                       out=str(tmp_path / "safe"), router="llm-embed", epochs=2, hidden=8,
                                       target="margin", safe=True, val_fraction=0.4, progress=False),
                           model=llm[0], tokenizer=llm[1])
    assert pudding.router.config.target == "margin" and pudding.router.config.default_set in (0, 1)
    reloaded = PuddingModel.from_pretrained(tmp_path / "safe", model=llm[0], tokenizer=llm[1])
    assert reloaded.router.config == pudding.router.config
    prompts = ["Question: What melts ice?\nAnswer:", "The cat sat on the"]
    assert [r.set_index for r in reloaded.route(prompts)] == [r.set_index for r in pudding.route(prompts)]
    assert {"acc_safe", "acc_safe_crossfit", "switch_rate"} <= set(pudding.training["safe"])


# --- generation --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pudding_model(trained):
    return trained[1]


def _alone(pudding, prompt, blocks, n):
    batch = pudding.tokenizer(prompt, return_tensors="pt")
    with omit_blocks(pudding.model, blocks):
        out = pudding.model.generate(**batch, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                     min_new_tokens=n)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def test_mixed_set_batch_equals_each_prompt_alone(pudding_model):
    pudding = pudding_model
    prompts = ["The man turned on the faucet.", "Sarah was a much better surgeon", "A revolving door",
               "How do I ready a guinea pig cage"]
    routes = [Route(i, SETS[i], "s", [0.0] * len(SETS)) for i in (0, 1, 0, 3)]
    outputs = pudding.generate(prompts, routes=routes, max_new_tokens=6, min_new_tokens=6)
    for prompt, route, out in zip(prompts, routes, outputs):
        expected = _alone(pudding, prompt, route.blocks, 6)
        assert out.text == pudding.tokenizer.decode(expected, skip_special_tokens=True)
        assert out.route == route and out.completion_tokens == 6
    # and routed end to end, each prompt gets the set the router chose for it
    routed = pudding.generate(prompts, max_new_tokens=3)
    assert [g.route for g in routed] == pudding.route(prompts)


def test_bad_prompts_are_refused(pudding_model):
    with pytest.raises(ConfigError, match="empty"):
        pudding_model.route(["fine", "   "])
    with pytest.raises(ConfigError, match="no prompts"):
        pudding_model.generate([])
    with pytest.raises(ConfigError, match="context of 128"):
        pudding_model.generate(["word " * 120], max_new_tokens=16)
    # the router itself truncates: a long prompt routes fine
    assert len(pudding_model.route(["word " * 500])) == 1


# --- the command line --------------------------------------------------------------------------------------


def test_cli_route_and_generate(trained, tmp_path, capsys, monkeypatch, llm):
    out, pudding = trained
    monkeypatch.setattr(PuddingModel, "from_pretrained",
                        classmethod(lambda cls, path, **kw: pudding))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?"}\n{"prompt": "The cat sat on"}\n')
    assert main(["route", "--model", str(out), "--file", str(prompts)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [tuple(line["blocks"]) for line in lines] == [r.blocks for r in pudding.route(
        ["What is the capital of France?", "The cat sat on"])]
    assert main(["generate", "--model", str(out), "--max-new-tokens", "3", "--compare-dense", "Hello"]) == 0
    text = capsys.readouterr().out
    assert "omit blocks" in text and "dense" in text


def test_cli_refuses_non_utf8_and_empty_prompt_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    assert main(["route", "--file", str(bad)]) == 2
    assert "bad.jsonl:2: not UTF-8" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    assert main(["route", "--file", str(empty)]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_cli_label_and_train_router(labelled, tmp_path, monkeypatch, llm, encoder_dir):
    import pudding.core.load
    import pudding.pool.executor

    root, _ = labelled
    monkeypatch.setattr(pudding.pool.executor, "load_model", lambda spec, **options: llm)  # the label executor's
    monkeypatch.setattr(pudding.core.load, "load_model", lambda spec, **options: llm)
    assert main(["label", "--pool", str(root / "pool"), "--tasks", "piqa", "--samples", "6",
                 "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "labels"), "--no-progress"]) == 0
    assert len(Labels.load(tmp_path / "labels").table) == 6
    assert main(["train-router", "--labels", str(root / "labels"), "--pool", str(root / "pool"),
                 "--router", "llm-embed", "--epochs", "2", "--out", str(tmp_path / "art"), "--no-progress"]) == 0
    assert (tmp_path / "art" / CONFIG_FILE).exists()
    assert main(["train-router", "--labels", str(root / "labels"), "--pool", str(root / "pool"), "--router",
                 "llm-embed", "--epochs", "2", "--target", "choice-prob", "--safe", "--out", str(tmp_path / "safe"),
                 "--no-progress"]) == 0
    router = json.loads((tmp_path / "safe" / CONFIG_FILE).read_text())["router"]
    assert router["target"] == "choice-prob" and router["default_set"] is not None


def test_a_router_only_model_refuses_to_save_before_writing_anything(trained, tmp_path):
    from pudding.routing.model import PuddingModel

    out, _ = trained
    router_only = PuddingModel.from_pretrained(out, router_only=True)
    if router_only.model is not None:
        pytest.skip("an llm-embed router loads its LLM even when only routing")
    with pytest.raises(ConfigError, match="router-only"):
        router_only.save_pretrained(tmp_path / "half")
    assert not (tmp_path / "half").exists()


def test_shipped_artifacts_resolve_by_name_and_the_k3_one_is_the_k3_runs_calibration_choice():
    """'default-k3' is the router the k=3 reproduction chose on calibration prompts (scripts/build_default.sh
    step 9 retrains it from the committed labels): the same weights, the same choice-prob target and sets."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from pudding.pool.artifact import SHIPPED_ARTIFACTS, artifact_folder

    assert artifact_folder("default") == SHIPPED_ARTIFACTS["default"] and artifact_folder("x/y") == Path("x/y")
    shipped = artifact_folder("default-k3")
    name = "task-mse-choice-prob-pool-plus-baselines-safe-top3"
    chosen = Path(__file__).parents[1] / "results/smollm2/medium/k3/routers" / name
    main = json.loads((chosen.parents[1] / "main.json").read_text())
    assert name in next(row for row in main["kinds"] if row.startswith("PuDDing, best variant"))
    ours, theirs = load_file(shipped / "router.safetensors"), load_file(chosen / "router.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((shipped / "pudding.json").read_text())
    assert config["router"]["target"] == "choice-prob" and config["router"]["default_set"] is not None
    sets = [json.loads((folder / "pool.json").read_text())["sets"] for folder in (shipped, chosen)]
    assert sets[0] == sets[1]


def test_the_shipped_adaptive_artifact_is_the_router_whose_target_calibration_chose():
    """'default-adaptive' is the ladder router with the label target that scripts/adaptive_target.sh chose on
    held-out calibration prompts (its choice.json), with the same weights (scripts/build_default.sh step 10)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from pudding.pool.artifact import artifact_folder

    adaptive = Path(__file__).parents[1] / "results/smollm2/adaptive"
    chosen = json.loads((adaptive / "target-selection" / "choice.json").read_text())["chosen"]
    trained = adaptive / ("router" if chosen == "tl" else f"router-{chosen}")
    shipped = artifact_folder("default-adaptive")
    assert json.loads((shipped / "pudding.json").read_text())["router"]["target"] == chosen
    ours, theirs = load_file(shipped / "router.safetensors"), load_file(trained / "router.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
