"""Two processes never write one output: every long stage holds a lock on its output folders."""

import pytest

from pudding.core.errors import ConfigError
from pudding.core.provenance import exclusive_output
from pudding.evaluation.reproduce import ReproduceConfig, reproduce
from pudding.pruning.candidates import PoolConfig, build_baselines, build_pool
from pudding.routing.labels import LabelConfig, build_labels
from pudding.routing.train import TrainConfig, train_router


def _stages(tmp_path, tiny_dir):
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    pool = PoolConfig(model=tiny_dir, tasks="piqa", objectives="tl", k=2, samples=4, run_dir=run, out=out,
                      progress=False)
    everything = ReproduceConfig(model=tiny_dir, budget="tiny", out=out, run_dir=run)
    return {
        "candidates": (lambda: build_pool(pool), [run, out]),
        "baselines": (lambda: build_baselines(pool, ("sleb",)), [run, out]),
        "label": (lambda: build_labels(LabelConfig(pool=str(tmp_path / "pool"), out=out, run_dir=run)), [run, out]),
        "train-router": (lambda: train_router(TrainConfig(labels=str(tmp_path / "labels"), pool=str(tmp_path / "pool"),
                                                          out=out)), [out]),
        "reproduce": (lambda: reproduce(everything), [str(everything.folder), str(everything.work_dir)]),
    }


@pytest.mark.parametrize("stage", ["candidates", "baselines", "label", "train-router", "reproduce"])
def test_a_stage_refuses_an_output_another_process_is_writing(stage, tmp_path, tiny_dir):
    run_stage, outputs = _stages(tmp_path, tiny_dir)[stage]
    for busy in outputs:
        with exclusive_output(busy):
            with pytest.raises(ConfigError, match="being written by another pudding process"):
                run_stage()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
