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


def test_atomic_outputs_are_readable_by_others_even_when_the_writer_recreates_the_file(tmp_path):
    """safetensors' save_file replaces the temporary file with a new 0600 one; the published file must
    still be readable by others (the umask here is the default 022), and a failed write leaves nothing."""
    import torch
    from safetensors.torch import save_file

    from pudding.core.provenance import atomic_output

    target = tmp_path / "router.safetensors"
    with atomic_output(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert target.stat().st_mode & 0o044 == 0o044, oct(target.stat().st_mode)
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "broken.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
        raise RuntimeError("the writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router.safetensors"]


def test_provenance_names_the_cpu_features_low_precision_speed_depends_on(tmp_path):
    from pudding.core.provenance import cpu_description, provenance

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\n"
                    "flags\t\t: fpu sse avx2 avx512_bf16 avx512_vnni\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: amx_int8\n")
    assert cpu_description(info) == {"cpu": "Example CPU 9000", "cpu_flags": ["avx2", "avx512_vnni", "avx512_bf16"]}
    assert cpu_description(tmp_path / "missing") == {}
    assert {"platform", "cpus"} <= set(provenance()["machine"])
