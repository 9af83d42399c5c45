"""`pudding reproduce` end to end on a tiny model (tiny budget): every table, ablation and plot is written."""

import json

import pytest

from pudding.reproduce import ReproduceConfig, paired_differences, reproduce


def test_paired_differences():
    columns = {"a": [1, 1, 0, 1], "b": [0, 1, 0, 0]}
    d = paired_differences(columns, "a", ["b"])["b"]
    assert d["difference"] == pytest.approx(0.5) and d["ci95"][0] < 0.5 < d["ci95"][1] and d["n"] == 4


def test_reproduce_end_to_end_on_a_tiny_model(tiny_dir, tmp_path):
    config = ReproduceConfig(model=tiny_dir, k=2, budget="tiny", out=str(tmp_path / "out"),
                             run_dir=str(tmp_path / "run"), routers=(("llm-embed", "mse"), ("llm-embed", "ce")),
                             progress=False)
    result = reproduce(config)
    out = tmp_path / "out"
    main = json.loads((out / "main.json").read_text())
    rows = main["rows"]
    for row in ("dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "random pool set",
                "PuDDing (llm-embed-mse)", "oracle"):
        assert row in rows
        assert all(cell["n"] == 8 for cell in rows[row]["tasks"].values())
    # the oracle is an upper bound of every routing decision over the same pool, document by document
    assert rows["oracle"]["average"] >= rows["PuDDing (llm-embed-mse)"]["average"]
    assert rows["oracle"]["average"] >= rows["best static TL set"]["average"]
    assert set(main["paired_differences"]) >= {"dense", "sleb"}
    assert main["provenance"]["git"] and main["budget"]["paper_tasks"] == 8
    for name in ("generalisation.json", "ablation-router.json", "ablation-objective.json", "ablation-pool_size.json",
                 "omission-rates.png", "README.md"):
        assert (out / name).exists(), name
    assert "PuDDing (llm-embed-ce)" in json.loads((out / "ablation-router.json").read_text())["rows"]
    # a rerun resumes from the saved scores and reproduces the tables exactly
    again = reproduce(config)
    assert again["tables"]["main"]["rows"] == result["tables"]["main"]["rows"]
