"""LaCo and LLM-Streamline: the merge arithmetic, the run choice, the training, and checkpoints that vanilla
transformers loads with the same logits as the model built in memory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pudding.cli import main
from pudding.core.errors import ConfigError, UnknownNameError
from pudding.core.omit import get_blocks
from pudding.pruning.compress import RECORD_FILE, calibration_text, pack_text
from pudding.pruning.laco import LacoConfig, laco, merge_into, next_threshold
from pudding.pruning.streamline import (
    StreamlineConfig,
    TrainSettings,
    most_similar_run,
    remaining_blocks,
    run_similarities,
    streamline,
)

from tiny import BLOCK_PREFIX, NUM_LAYERS, tiny_model, tiny_tokenizer

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])
# One weight per family that a merge must change, and one norm weight it must not.
MERGED = {"llama": ("self_attn.q_proj.weight", "input_layernorm.weight"),
          "opt": ("fc1.weight", "final_layer_norm.weight"),
          "gemma2": ("mlp.down_proj.weight", "post_feedforward_layernorm.weight")}
# The projections that write into the residual stream: zeroed, they make a block the identity.
OUTPUT_PROJECTIONS = {"llama": ("o_proj", "down_proj"), "opt": ("out_proj", "fc2")}


def _block_param(state: dict, family: str, block: int, name: str) -> torch.Tensor:
    return state[f"{BLOCK_PREFIX[family]}.{block}.{name}"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_rdsc_merge_is_the_base_plus_the_sum_of_differences(family):
    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = get_blocks(model)
    merge_into(blocks[1], [blocks[2], blocks[3], blocks[4]])
    weight, norm = MERGED[family]
    base = _block_param(state, family, 1, weight)
    expected = base + sum(_block_param(state, family, b, weight) - base for b in (2, 3, 4))
    merged = dict(blocks[1].named_parameters())
    assert torch.allclose(merged[weight], expected, atol=1e-6)
    assert not torch.allclose(merged[weight], base)
    assert torch.equal(merged[norm], _block_param(state, family, 1, norm))  # norms stay the base's
    for b in (2, 3, 4):  # the merged-in blocks are read, not changed
        assert torch.equal(dict(blocks[b].named_parameters())[weight], _block_param(state, family, b, weight))


def test_the_released_code_rule_leaves_the_last_merged_block():
    model = tiny_model("llama")
    blocks = get_blocks(model)
    last = blocks[3].self_attn.q_proj.weight.detach().clone()
    merge_into(blocks[1], [blocks[2], blocks[3]], rule="released_code")
    assert torch.equal(blocks[1].self_attn.q_proj.weight, last)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_laco_removes_exactly_k_and_the_checkpoint_reloads_with_identical_logits(family, tmp_path):
    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    record = laco(LacoConfig(model=family, k=3, samples=4, out=str(tmp_path / "laco"), progress=False),
                  model=model, tokenizer=tiny_tokenizer())
    assert record["num_blocks"] == NUM_LAYERS - 3 == len(get_blocks(record["model"]))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "laco").eval()
    assert loaded.config.num_hidden_layers == NUM_LAYERS - 3
    assert torch.allclose(loaded(IDS).logits, _logits(record["model"]), atol=1e-5)
    # C=4 and k=3: one accepted merge of three blocks into its base, computed on the original weights.
    [group] = [g for g in record["blocks"] if len(g) > 1]
    assert len(group) == 4 and sorted(group) == group
    weight, norm = MERGED[family]
    base = _block_param(state, family, group[0], weight)
    expected = base + sum(_block_param(state, family, b, weight) - base for b in group[1:])
    saved = _block_param(loaded.state_dict(), family, record["blocks"].index(group), weight)
    assert torch.allclose(saved, expected, atol=1e-6)
    written = json.loads((tmp_path / "laco" / RECORD_FILE).read_text())
    assert written["method"] == "laco" and written["k"] == 3 and written["provenance"]["git"]["commit"]
    assert written["calibration"]["task"] == "boolq" and len(written["calibration"]["doc_ids"]) == 4
    assert json.loads((tmp_path / "laco" / "config.json").read_text())["pudding_compress"]["k"] == 3


def test_laco_threshold_gates_merges_and_a_rejected_merge_leaves_the_model_exact():
    model = tiny_model("llama")
    before = _logits(model)
    record = laco(LacoConfig(model="llama", k=None, threshold=1.0, samples=4, progress=False), model=model,
                  tokenizer=tiny_tokenizer())
    assert record["k"] == 0 and record["result"]["merges"]
    assert not any(m["accepted"] for m in record["result"]["merges"])
    assert torch.equal(_logits(model), before)  # every rejected merge was undone bit for bit
    accept_all = laco(LacoConfig(model="llama", k=None, threshold=-1.0, samples=4, progress=False),
                      model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    # The paper's single sweep over blocks 1..4 with C=4: the first try (base 1) takes 2, 3 and 4.
    assert accept_all["k"] == 3 and accept_all["blocks"] == [[0], [1, 2, 3, 4], [5]]


def test_laco_relaxes_the_threshold_until_exactly_k_blocks_are_gone():
    record = laco(LacoConfig(model="llama", k=2, threshold=1.0, samples=4, progress=False),
                  model=tiny_model("llama"), tokenizer=tiny_tokenizer())
    assert record["k"] == 2 and record["num_blocks"] == NUM_LAYERS - 2
    assert record["result"]["sweeps"] > 1 and record["result"]["final_threshold"] < 1.0
    accepted = [m for m in record["result"]["merges"] if m["accepted"]]
    assert sum(len(m["merged_blocks"]) for m in accepted) == 2
    assert all(m["similarity"] > m["threshold"] for m in accepted)
    assert next_threshold(0.5, 0.49, 0.05) == pytest.approx(0.45)  # at least one step down
    assert next_threshold(0.5, 0.2, 0.05) < 0.2  # and below the best rejected similarity


def _make_identity(model, family: str, blocks) -> None:
    with torch.no_grad():
        for b in blocks:
            for name, module in get_blocks(model)[b].named_modules():
                if name.rsplit(".", 1)[-1] in OUTPUT_PROJECTIONS[family]:
                    for p in module.parameters():
                        p.zero_()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamline_picks_the_near_identity_run_and_removing_it_keeps_the_logits(family, tmp_path):
    model = tiny_model(family)
    _make_identity(model, family, (2, 3))
    before = _logits(model)
    batches = pack_text(model, tiny_tokenizer(), calibration_text(4), 64, 256)
    sims = run_similarities(model, batches, [2, 3], (1, 1))
    assert sorted(sims[3]) == [1, 2]  # the 3-runs within blocks 1..4 (barriers 1,1 of 6 blocks)
    sims = sims[2]
    assert most_similar_run(sims) == 2 and sims[2] == pytest.approx(1.0, abs=1e-5)
    assert max(v for s, v in sims.items() if s != 2) < 0.9999
    record = streamline(StreamlineConfig(model=family, k=2, train=None, samples=4, out=str(tmp_path / "s"),
                                         progress=False), model=model, tokenizer=tiny_tokenizer())
    assert record["removed_run"] == [2, 3]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert loaded.config.num_hidden_layers == NUM_LAYERS - 2
    assert torch.allclose(loaded(IDS).logits, before, atol=1e-5)  # the removed blocks did nothing


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_the_trained_replacement_lowers_the_error_and_reloads_with_identical_logits(family, tmp_path):
    model = tiny_model(family)
    original = copy.deepcopy(model)
    settings = TrainSettings(steps=30, lr=1e-3, train_samples=8, val_samples=4, eval_every=10, warmup_steps=2)
    record = streamline(StreamlineConfig(model=family, k=2, train=settings, samples=4, out=str(tmp_path / "s"),
                                         progress=False), model=model, tokenizer=tiny_tokenizer())
    training = record["training"]
    assert training["val_mse_trained"] < training["val_mse_untrained"]
    assert training["best_step"] > 0
    run = record["replaced_run"]
    assert len(run) == 3 and record["num_blocks"] == NUM_LAYERS - 2
    assert record["blocks"] == remaining_blocks(NUM_LAYERS, run, replaced=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    assert loaded.config.num_hidden_layers == NUM_LAYERS - 2
    assert torch.allclose(loaded(IDS).logits, _logits(record["model"]), atol=1e-5)
    # Only the replacement block was trained: every other block is the original's.
    new, old = get_blocks(loaded), get_blocks(original)
    for position, group in enumerate(record["blocks"]):
        same = all(torch.equal(a, b) for a, b in zip(new[position].state_dict().values(),
                                                     old[group[0]].state_dict().values()))
        assert same == (group != run)
    history = json.loads((tmp_path / "s" / "training.json").read_text())["history"]
    assert len(history["steps"]) == 30 and history["val"][0]["step"] == 0
    assert (tmp_path / "s" / "training.png").stat().st_size > 0


def test_remaining_blocks_accounts_for_the_replacement():
    assert remaining_blocks(6, [2, 3, 4], replaced=True) == [[0], [1], [2, 3, 4], [5]]
    assert remaining_blocks(6, [2, 3], replaced=False) == [[0], [1], [4], [5]]


def test_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="merge_layers"):
        LacoConfig(merge_layers=1)
    with pytest.raises(ConfigError, match="threshold"):
        LacoConfig(threshold=1.5)
    with pytest.raises(UnknownNameError, match="rdsc"):
        LacoConfig(rule="average")
    with pytest.raises(ConfigError, match="k must be"):
        StreamlineConfig(k=0)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainSettings(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="k=6 is too large"):
        LacoConfig(k=6).layer_range(NUM_LAYERS)
    with pytest.raises(ConfigError, match="k\\+1=5"):
        StreamlineConfig(k=4).check_model(NUM_LAYERS)  # a 5-run does not fit between barriers 1,1 of 6 blocks
    StreamlineConfig(k=4, train=None).check_model(NUM_LAYERS)  # plain removal of 4 does


@pytest.mark.parametrize("argv, message", [
    (["--method", "average"], "unknown compression method 'average'; known: laco, streamline"),
    (["--method", "laco", "--k", "5"], "k=5 is too large"),
    (["--method", "streamline", "--k", "4"], "a run of k+1=5 blocks"),
    (["--method", "streamline", "--k", "5", "--no-train"], "only 4 of the 6 blocks"),
    (["--method", "streamline", "--threshold", "0.5"], "--threshold does not apply to --method streamline"),
    (["--method", "laco", "--no-train"], "--no-train does not apply to --method laco"),
    (["--method", "streamline", "--no-train", "--lr", "0.1"], "--lr sets up training, which --no-train skips"),
    (["--method", "laco", "--barriers", "1"], "barriers must be two non-negative integers"),
])
def test_bad_compress_input_is_one_line(argv, message, tiny_dir, tmp_path, capsys):
    status = main(["compress", "--model", tiny_dir, "--out", str(tmp_path / "out"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_compress_refuses_a_non_empty_out_before_loading(tiny_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    status = main(["compress", "--method", "laco", "--model", tiny_dir, "--k", "2", "--out", str(tmp_path / "out")])
    assert status == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_compress_cli_builds_a_checkpoint_that_pudding_eval_scores(tiny_dir, tmp_path, capsys):
    out = tmp_path / "laco"
    assert main(["compress", "--method", "laco", "--model", tiny_dir, "--k", "2", "--samples", "4",
                 "--out", str(out), "--no-progress"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == NUM_LAYERS - 2
    assert main(["eval", "--model", str(out), "--tasks", "piqa", "--limit", "2", "--output-dir",
                 str(tmp_path / "eval"), "--no-progress"]) == 0
    assert "piqa" in capsys.readouterr().out
