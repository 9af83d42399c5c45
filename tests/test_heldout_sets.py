"""benchmarks/heldout_sets.py: sets compared on calibration documents after the searched ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pudding.core.tasks import get_task

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import heldout_sets  # noqa: E402


def test_scores_the_documents_after_the_skipped_ones_with_paired_differences(tiny_dir, tmp_path):
    out = tmp_path / "heldout.json"
    assert heldout_sets.main(["--model", tiny_dir, "--task", "piqa", "--skip", "5", "--limit", "6",
                              "--sets", "dense;1,2;3-4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    metric = get_task("piqa").metric
    assert report["documents"] == 6 and report["metric"] == metric
    assert [r["set"] for r in report["rows"]] == [[], [1, 2], [3, 4]]
    first = report["rows"][0][metric]
    for row in report["rows"]:
        # the paired mean difference is the difference of the two accuracies over the same documents
        assert row["minus_first"]["mean"] == pytest.approx(row[metric] - first)
    assert report["rows"][0]["minus_first"] == {"mean": 0.0, "se": 0.0, "low": 0.0, "high": 0.0}


def test_paired_interval_uses_the_spread_of_the_differences():
    result = heldout_sets.paired([1, 1, 0, 1], [0, 1, 0, 0])
    assert result["mean"] == pytest.approx(0.5)
    assert result["se"] == pytest.approx((1 / 3) ** 0.5 / 2)  # sample sd of [1,0,0,1] over sqrt(4)


def test_a_skip_past_the_split_and_a_bad_set_are_refused(tiny_dir, capsys):
    assert heldout_sets.main(["--model", tiny_dir, "--task", "copa", "--skip", "10000", "--limit", "2",
                              "--sets", "dense"]) == 2
    assert "calibration documents; lower --skip" in capsys.readouterr().err
    assert heldout_sets.main(["--model", tiny_dir, "--task", "piqa", "--skip", "0", "--limit", "2",
                              "--sets", "dense;99"]) == 2
    assert "error:" in capsys.readouterr().err
