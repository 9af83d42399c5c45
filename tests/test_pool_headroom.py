"""benchmarks/pool_headroom.py: per-task choices against one static set, on held-out halves of calibration labels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import pool_headroom  # noqa: E402


def _data(n=40):
    # task a is answered by set 1 only, task b by set 0 only; the TL labels favour the wrong set in both
    tasks = ["a"] * n + ["b"] * n
    correct = torch.zeros(2 * n, 2)
    correct[:n, 1] = 1
    correct[n:, 0] = 1
    tl = 1 - correct
    return correct, tl, tasks


def test_task_choice_finds_what_one_static_set_cannot():
    correct, tl, tasks = _data()
    result = pool_headroom.headroom(correct, tl, tasks, repeats=5, seed=0)
    assert result["best static"]["mean"] == pytest.approx(0.5)
    assert result["task-best by accuracy"]["mean"] == pytest.approx(1.0)
    assert result["task-best by TL"]["mean"] == pytest.approx(0.0)
    assert result["oracle"]["mean"] == pytest.approx(1.0)
    assert result["task-best by accuracy minus best static"]["mean"] == pytest.approx(0.5)


def test_choices_are_made_on_one_half_and_scored_on_the_other():
    correct, tl, tasks = _data(n=4)
    correct[0:4, :] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # task a: a tie overall
    first = {"a": torch.tensor([0, 1]), "b": torch.tensor([4, 5])}
    second = {"a": torch.tensor([2, 3]), "b": torch.tensor([6, 7])}
    # chosen on rows 0-1 (set 0 wins), scored on rows 2-3 (set 0 never answers): held-out accuracy 0 for task a
    result = pool_headroom.one_split(correct, tl, first, second)
    assert result["task-best by accuracy"] == pytest.approx((0.0 + 1.0) / 2)
    halves = pool_headroom.split_halves(tasks, torch.Generator().manual_seed(1))
    for task in ("a", "b"):
        assert sorted(torch.cat([halves[0][task], halves[1][task]]).tolist()) == \
            [i for i, t in enumerate(tasks) if t == task]


def test_a_missing_label_artifact_is_a_one_line_error(tmp_path, capsys):
    assert pool_headroom.main(["--labels", str(tmp_path / "nothing")]) == 2
    assert "no label artifact" in capsys.readouterr().err


def test_the_dense_reference_is_never_a_choice(monkeypatch, tmp_path):
    from types import SimpleNamespace

    correct, tl, tasks = _data()
    # a dense column that answers everything: were it a choice, static and task-best would both reach 1.0
    correct = torch.cat([torch.ones(len(tasks), 1), correct], 1)
    tl = torch.cat([torch.ones(len(tasks), 1), tl], 1)
    labels = SimpleNamespace(meta={"sets": [[], [1], [2]], "set_names": ["dense", "one", "two"]})
    monkeypatch.setattr(pool_headroom.Labels, "load", lambda path: labels)
    monkeypatch.setattr(pool_headroom, "routing_data",
                        lambda labels, target: SimpleNamespace(correct=correct, labels=tl, tasks=tasks))
    out = tmp_path / "headroom.json"
    assert pool_headroom.main(["--labels", "x", "--repeats", "3", "--out", str(out)]) == 0
    import json

    report = json.loads(out.read_text())
    assert report["sets"] == ["one", "two"]
    assert report["split_half"]["best static"]["mean"] == pytest.approx(0.5)
    assert report["split_half"]["oracle"]["mean"] == pytest.approx(1.0)
