"""benchmarks/search_fit.py: a searched set on the documents it searched against the prompts it never read."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import search_fit  # noqa: E402


def test_a_set_that_fitted_its_search_documents_is_told_apart_on_the_others():
    # task a: 4 searched prompts, 6 others; column 0 is the searched set, column 1 the static one
    tasks = ["a"] * 10 + ["b"] * 2
    doc_ids = [f"d{i}" for i in range(12)]
    correct = torch.zeros(12, 2)
    correct[:4, 0] = 1          # the set answers every searched prompt ...
    correct[4:10, 1] = 1        # ... and none of the others, which the static set answers
    result = search_fit.fit(correct, tasks, doc_ids, column=0, static=1, task="a",
                            searched_ids={"d0", "d1", "d2", "d3", "d10"})  # d10 is task b's: not counted
    assert (result["n_searched"], result["n_held_out"]) == (4, 6)
    assert result["searched"] == {"set": 1.0, "static": 0.0}
    assert result["held_out"] == {"set": 0.0, "static": 1.0}
    assert result["held_out_minus_static"]["mean"] == pytest.approx(-1.0)


def test_the_paired_interval_narrows_with_more_prompts_and_centres_on_the_mean():
    few = search_fit.paired_interval(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    many = search_fit.paired_interval(torch.tensor([1.0, 0.0] * 50))
    assert few[0] == many[0] == pytest.approx(0.5)
    assert many[2] - many[1] < few[2] - few[1]
    assert few[1] < 0.5 < few[2]


def test_the_best_static_set_is_chosen_by_the_mean_of_per_task_accuracies():
    # column 0 wins the big task a, column 1 the small task b by more: per-task means favour column 1
    tasks = ["a"] * 8 + ["b"] * 2
    correct = torch.zeros(10, 2)
    correct[:8, 0] = 1
    correct[:6, 1] = 1
    correct[8:, 1] = 1
    assert search_fit.best_static(correct, tasks, [0, 1]) == 1


def test_labels_without_the_searched_or_other_prompts_are_refused():
    with pytest.raises(ValueError, match="0 searched and 2 other prompts"):
        search_fit.fit(torch.ones(2, 2), ["a", "a"], ["x", "y"], 0, 1, "a", {"z"})


def test_a_missing_label_artifact_is_a_one_line_error(tmp_path, capsys):
    assert search_fit.main(["--labels", str(tmp_path / "nothing"), "--pool", str(tmp_path)]) == 2
    assert "no label artifact" in capsys.readouterr().err
