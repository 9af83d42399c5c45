"""Exported pruned checkpoints load with vanilla transformers and match in-library omission."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pudding.cli import main
from pudding.core.errors import ConfigError
from pudding.core.omit import omit_blocks
from pudding.pruning.export import MANIFEST_FILE, export_all_sets, export_pruned

from tiny import tiny_model, tiny_tokenizer

OMIT = (1, 3)
SETS = [(1, 2), (2, 3)]
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8]])


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "opt", "gpt2", "gpt_neox", "phi3"])
def test_export_loads_with_vanilla_transformers_and_matches(family, tmp_path):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_pruned(model, tiny_tokenizer(), OMIT, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers - len(OMIT)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["pudding_export"]["omitted_blocks"] == list(OMIT)
    if "layer_types" in config:
        assert len(config["layer_types"]) == config["num_hidden_layers"]
    with torch.no_grad(), omit_blocks(model, OMIT):
        expected = model(IDS).logits
    with torch.no_grad():
        assert torch.allclose(loaded(IDS).logits, expected, atol=1e-5)
    # the source model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "pudding_export")


def test_export_refuses_bad_sets_and_non_empty_folders(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        export_pruned(model, None, (9,), tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_pruned(model, None, OMIT, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_export_all_sets_writes_a_manifest(tmp_path, tiny_dir):
    from pudding.core.load import model_fingerprint
    from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
    from pudding.routing.model import PuddingModel
    from pudding.routing.router import RouterConfig, build_router

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS[:2])
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    router = build_router(RouterConfig("llm-embed", 2, "llm", hidden=8), llm=model, llm_tokenizer=tiny_tokenizer())
    out = export_all_sets(PuddingModel(model, tiny_tokenizer(), pool, router), tmp_path / "sets")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [s["blocks"] for s in manifest["sets"]] == [list(s) for s in SETS[:2]]
    for entry in manifest["sets"]:
        loaded = AutoModelForCausalLM.from_pretrained(out / entry["path"])
        assert loaded.config.num_hidden_layers == 6 - len(entry["blocks"])


def test_two_writers_never_mix_their_files(tmp_path):
    """A second export to a busy --out is refused; two temp folders are never shared; a late one is discarded."""
    from pudding.core.provenance import atomic_folder, exclusive_output

    model = tiny_model("llama")
    out = tmp_path / "pruned"
    with exclusive_output(out):
        with pytest.raises(ConfigError, match="another pudding process"):
            export_pruned(model, None, OMIT, out)
    assert not out.exists()
    with pytest.raises(ConfigError, match="appeared while it was being written"):
        with atomic_folder(out) as first, atomic_folder(out) as second:
            assert first != second
            (first / "config.json").write_text("first")
            (second / "config.json").write_text("second")
    # the writer that finished first keeps the folder whole; the late one is discarded, not mixed in
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == "second"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_export_files_are_readable_and_symlinked_out_is_followed(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    out = export_pruned(tiny_model("llama"), tiny_tokenizer(), OMIT, tmp_path / "link")
    assert out == target.resolve() and (target / "model.safetensors").is_file()
    # others may read what we publish (safetensors used to land as 0600); the umask here is the default 022
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in target.iterdir()), \
        {p.name: oct(p.stat().st_mode) for p in target.iterdir()}


def test_export_all_sets_refuses_a_folder_holding_another_set(tmp_path, tiny_dir):
    from pudding.core.load import model_fingerprint
    from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
    from pudding.routing.model import PuddingModel
    from pudding.routing.router import RouterConfig, build_router

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    router = build_router(RouterConfig("llm-embed", 2, "llm", hidden=8), llm=model, llm_tokenizer=tiny_tokenizer())
    export_pruned(model, None, SETS[1], tmp_path / "sets" / "set-0")  # set-0 holds set 1's model
    with pytest.raises(ConfigError, match=r"set-0 holds a model without blocks \[2, 3\]"):
        export_all_sets(PuddingModel(model, tiny_tokenizer(), pool, router), tmp_path / "sets")
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        export_all_sets(PuddingModel(model, tiny_tokenizer(), pool, router), tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "keep me"


def test_cli_export(tmp_path, tiny_dir, capsys):
    assert main(["export", "--model", tiny_dir, "--omit", "2,4", "--out", str(tmp_path / "e")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "e").config.num_hidden_layers == 4
    assert main(["export", "--model", tiny_dir, "--omit", "0,99", "--out", str(tmp_path / "f")]) == 2
    assert "pudding: error" in capsys.readouterr().err
