"""One parser and one validator of omission sets, wherever a set comes from: text, configs, pool.json, lm-eval."""

import json

import pytest
import torch

from pudding.core.errors import ConfigError
from pudding.core.load import model_fingerprint
from pudding.core.omit import omission_key, parse_block_list, parse_omission, require_whole_blocks, validate_omission
from pudding.evaluation.zero_shot import EvalConfig
from pudding.healing.lora import HealConfig
from pudding.pool.artifact import POOL_FILE, CandidatePool, PoolEntry, SetSource
from pudding.routing.model import PuddingModel
from pudding.routing.router import RouterConfig, build_router

from tiny import NUM_LAYERS, tiny_model, tiny_tokenizer

SETS = [(1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("text", ["none", "dense", " None ", "DENSE", ""])
def test_every_parser_reads_none_and_dense_as_the_empty_set(text):
    assert parse_block_list(text) == []
    assert validate_omission(text, NUM_LAYERS) == ()
    assert parse_omission(text, NUM_LAYERS).key == ()
    assert omission_key(text, None) == ()
    assert require_whole_blocks(text, NUM_LAYERS, "x") == ()
    assert EvalConfig(model="unused", tasks="piqa", omissions=(text,)).omissions == ((),)


def test_a_word_other_than_none_or_dense_is_still_refused():
    with pytest.raises(ConfigError, match="comma-separated block indices"):
        validate_omission("nothing", NUM_LAYERS)


def test_heal_sets_are_parsed_and_checked_by_the_same_functions(tmp_path):
    config = HealConfig(omit="3,2; 4", out=str(tmp_path))
    assert config.omit == ((2, 3), (4,))
    with pytest.raises(ConfigError, match="dense model needs no healing"):
        HealConfig(omit="1;none", out=str(tmp_path))
    with pytest.raises(ConfigError, match="pudding heal --omit takes whole blocks only"):
        HealConfig(omit="1,2.attn", out=str(tmp_path))
    with pytest.raises(ConfigError, match="more than once"):
        HealConfig(omit="1,1", out=str(tmp_path))
    # --sets are pool indices, not an omission set: "none" does not silently mean "every set"
    with pytest.raises(ConfigError, match="comma-separated pool indices"):
        HealConfig(pool="default", sets="none")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny saved PuDDing artifact (pool of three sets and an untrained router) and its LLM."""
    folder = tmp_path_factory.mktemp("artifact")
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    model.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "llm")
    entries = tuple(PoolEntry(s, (SetSource("greedy", f"t{i}", "tl", list(s), [], [], 0.0),))
                    for i, s in enumerate(SETS))
    pool = CandidatePool(entries, {"spec": str(folder / "llm"), "name": "tiny",
                                   "fingerprint": model_fingerprint(model.config)})
    torch.manual_seed(0)
    router = build_router(RouterConfig("llm-embed", len(SETS), "llm", hidden=8), llm=model, llm_tokenizer=tokenizer)
    PuddingModel(model, tokenizer, pool, router).save_pretrained(folder / "pudding")
    return folder / "pudding", model, tokenizer


@pytest.mark.parametrize("blocks, problem", [
    ([1, NUM_LAYERS], rf"blocks \[{NUM_LAYERS}\] are out of range: the model has blocks 0\.\.{NUM_LAYERS - 1}"),
    ([2, 2], r"lists blocks \[2\] more than once"),
    ([-1, 2], r"out of range"),
    ([1, 2.0], r"integer block indices, got 2\.0"),
    ([1, "2"], r"integer block indices, got '2'"),
])
def test_a_hand_edited_pool_json_is_refused_on_load_naming_the_set(artifact, tmp_path, blocks, problem):
    import shutil

    folder, model, tokenizer = artifact
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    data = json.loads((copy / POOL_FILE).read_text())
    data["sets"][1]["blocks"] = blocks
    (copy / POOL_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=rf"set 1 \(t1-tl\): .*{problem}"):
        CandidatePool.from_pretrained(copy)
    with pytest.raises(ConfigError, match=rf"set 1 \(t1-tl\): .*{problem}"):
        PuddingModel.from_pretrained(copy, model=model, tokenizer=tokenizer, adapters="none")
    # the untouched artifact loads: the refusal is the edit's, not the fixture's
    assert [e.blocks for e in PuddingModel.from_pretrained(folder, model=model, tokenizer=tokenizer).pool.sets] == SETS


def test_loading_a_pool_does_not_change_what_it_saved(artifact, tmp_path):
    folder, _, _ = artifact
    pool = CandidatePool.from_pretrained(folder)
    pool.save_pretrained(tmp_path)
    saved = json.loads((folder / POOL_FILE).read_text())["sets"]
    assert json.loads((tmp_path / POOL_FILE).read_text())["sets"] == saved


@pytest.mark.parametrize("omit, want", [("none", ()), ("Dense", ()), ("", ()), ("3;1", (1, 3)), ("1,3", (1, 3))])
def test_the_lm_eval_plugin_reads_omit_with_the_same_parser(artifact, omit, want):
    pytest.importorskip("lm_eval")
    from pudding.evaluation.lm_eval_plugin import PuddingLM

    folder, model, tokenizer = artifact
    assert PuddingLM(pretrained=str(folder), omit=omit, model=model, tokenizer=tokenizer).static == want


@pytest.mark.parametrize("omit, problem", [
    (f"1;{NUM_LAYERS}", "out of range"),
    ("1;1", "more than once"),
    ("1;x", "comma-separated block indices"),
    ("1.attn", "takes whole blocks only"),
])
def test_the_lm_eval_plugin_refuses_a_bad_omit_with_the_same_messages(artifact, omit, problem):
    pytest.importorskip("lm_eval")
    from pudding.evaluation.lm_eval_plugin import PuddingLM

    folder, model, tokenizer = artifact
    with pytest.raises(ConfigError, match=problem):
        PuddingLM(pretrained=str(folder), omit=omit, model=model, tokenizer=tokenizer)


def test_the_server_refuses_a_forced_set_the_pool_does_not_have(artifact):
    pytest.importorskip("fastapi")
    from pudding.serving.server import ServeSettings, create_app

    folder, model, tokenizer = artifact
    pudding = PuddingModel.from_pretrained(folder, model=model, tokenizer=tokenizer)
    for index in (len(SETS), -1):
        with pytest.raises(ConfigError, match=rf"force_set {index} is out of range: the pool has sets 0\.\.2"):
            create_app(pudding, ServeSettings(force_set=index))
    create_app(pudding, ServeSettings(force_set=len(SETS) - 1))
