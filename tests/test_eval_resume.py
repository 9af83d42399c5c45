"""An interrupted ``pudding eval`` resumes from its saved parts (pudding.evaluation.eval_parts).

A resumed run scores only what the interrupted one had not finished, and its result equals an uninterrupted
run's; parts of other settings, or unreadable ones, are scored again; the parts are removed once the result is
written.
"""

from __future__ import annotations

import json

import pytest

import pudding.evaluation.zero_shot as zero_shot
from pudding.evaluation.eval_parts import PARTS_DIR, content_stamp
from pudding.evaluation.zero_shot import EvalConfig, evaluate

TASKS = ("piqa", "arc_easy")
SCORE_DOCS = zero_shot.score_docs


class Interrupted(RuntimeError):
    pass


def count_scoring(monkeypatch, stop_after: int | None = None) -> list:
    """Count score_docs calls (one per part scored); raise Interrupted on call ``stop_after + 1``."""
    calls = []

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupted("killed")
        calls.append(1)
        return SCORE_DOCS(*args, **kwargs)

    monkeypatch.setattr(zero_shot, "score_docs", counted)
    return calls


def without_seconds(runs: list[dict]) -> list[dict]:
    return [{**run, "tasks": {t: {k: v for k, v in s.items() if k != "seconds"} for t, s in run["tasks"].items()}}
            for run in runs]


def config(tiny_dir, out, limit: int = 3) -> EvalConfig:
    return EvalConfig(model=tiny_dir, tasks=TASKS, omissions=((), (1, 2)), limit=limit, output_dir=str(out),
                      progress=False)


def test_an_interrupted_eval_resumes_and_equals_an_uninterrupted_one(tiny_dir, tmp_path, monkeypatch):
    whole = evaluate(config(tiny_dir, tmp_path / "whole"))
    assert "resumed_parts" not in whole
    out = tmp_path / "resumed"
    count_scoring(monkeypatch, stop_after=3)  # dense piqa, dense arc_easy, omit-1,2 piqa; then killed
    with pytest.raises(Interrupted):
        evaluate(config(tiny_dir, out))
    assert len(list((out / PARTS_DIR).glob("*/*.json"))) == 3 and not list(out.glob("eval-*.json"))
    calls = count_scoring(monkeypatch)
    resumed = evaluate(config(tiny_dir, out))
    assert len(calls) == 1  # only the part the interruption lost
    assert resumed["resumed_parts"] == ["row-0-piqa", "row-0-arc_easy", "row-1-piqa"]
    assert without_seconds(resumed["runs"]) == without_seconds(whole["runs"])
    assert not (out / PARTS_DIR).exists(), "the parts are removed once the result is written"
    (path,) = out.glob("eval-*.json")
    assert json.loads(path.read_text())["resumed_parts"] == resumed["resumed_parts"]


def test_parts_of_other_settings_or_unreadable_ones_are_scored_again(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    count_scoring(monkeypatch, stop_after=2)
    with pytest.raises(Interrupted):
        evaluate(config(tiny_dir, out))
    calls = count_scoring(monkeypatch, stop_after=0)  # another limit is another run: nothing reused
    with pytest.raises(Interrupted):
        evaluate(config(tiny_dir, out, limit=2))
    (first, second) = sorted((out / PARTS_DIR).glob("*/row-0-*.json"))
    first.write_text("{ not json")  # a damaged part is not trusted
    calls = count_scoring(monkeypatch)
    result = evaluate(config(tiny_dir, out))
    assert len(calls) == 3 and result["resumed_parts"] == [f"row-0-{second.stem.split('-', 2)[2]}"]


def test_the_content_stamp_follows_contents_not_times(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"weights")
    stamp = content_stamp(str(folder))
    (folder / ".a.pudding.lock").write_text("")  # locks and temporary files are not content
    (folder / "a.safetensors").touch()
    assert content_stamp(str(folder)) == stamp
    (folder / "a.safetensors").write_bytes(b"weightz")
    assert content_stamp(str(folder)) != stamp
    assert content_stamp("default") == "default" and content_stamp(None) is None
