"""The Ray executor gives the same pool and the same labels as the local one (local Ray cluster, 2 CPUs)."""

import hashlib

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

from pudding.core.errors import ConfigError  # noqa: E402
from pudding.pool.artifact import CandidatePool  # noqa: E402
from pudding.pool.executor import RaySettings, check_local_cluster_is_guarded, ray_init_kwargs  # noqa: E402
from pudding.pruning.candidates import PoolConfig, build_pool  # noqa: E402
from pudding.routing.labels import LABELS_FILE, LabelConfig, build_labels  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    check_local_cluster_is_guarded(RaySettings())
    ray.init(num_cpus=2, **ray_init_kwargs(RaySettings()))  # what --executor ray starts, sized for CI
    yield
    ray.shutdown()


def test_a_local_cluster_requires_token_authentication(cluster):
    """Ray cannot be confined to loopback, so a local cluster must at least refuse unauthenticated peers."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    assert is_token_auth_enabled()
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled"):
        check_local_cluster_is_guarded(RaySettings(), {"RAY_AUTH_MODE": "disabled"})
    check_local_cluster_is_guarded(RaySettings(), {"RAY_AUTH_MODE": "token"})
    check_local_cluster_is_guarded(RaySettings(address="ray://head:10001"), {"RAY_AUTH_MODE": "disabled"})
    assert ray_init_kwargs(RaySettings())["include_dashboard"] is False


def _pool(tiny_dir, root, executor):
    return build_pool(PoolConfig(model=tiny_dir, tasks="piqa", objectives="tl,margin", k=2, samples=4,
                                 run_dir=str(root / f"run-{executor}"), out=str(root / f"pool-{executor}"),
                                 progress=False, executor=executor))


def test_ray_search_equals_local_and_resumes(cluster, tiny_dir, tmp_path):
    local = _pool(tiny_dir, tmp_path, "local")
    distributed = _pool(tiny_dir, tmp_path, "ray")
    assert [e.blocks for e in distributed.sets] == [e.blocks for e in local.sets]
    for a, b in zip(local.sets, distributed.sets):
        for sa, sb in zip(a.sources, b.sources):
            assert sa.removal_order == sb.removal_order
            assert sa.trajectory == pytest.approx(sb.trajectory, abs=1e-6)
    # the ray run's checkpoints are the same format: a local rerun over them resumes without searching
    again = build_pool(PoolConfig(model=tiny_dir, tasks="piqa", objectives="tl,margin", k=2, samples=4,
                                  run_dir=str(tmp_path / "run-ray"), out=str(tmp_path / "pool-again"), progress=False))
    assert [e.blocks for e in again.sets] == [e.blocks for e in local.sets]


def test_ray_labels_equal_local_and_resume(cluster, tiny_dir, tmp_path):
    pool = _pool(tiny_dir, tmp_path, "local")
    assert isinstance(pool, CandidatePool)

    def config(name, executor):
        return LabelConfig(pool=str(tmp_path / "pool-local"), out=str(tmp_path / f"out-{name}"), tasks="piqa,arc_easy",
                           samples=6, shard_size=4, run_dir=str(tmp_path / f"labels-{name}"), progress=False,
                           executor=executor)

    build_labels(config("local", "local"))

    def crash(index):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_labels(config("ray", "ray"), on_shard=crash)
    build_labels(config("ray", "ray"))
    digest = [hashlib.sha256((tmp_path / f"out-{n}" / LABELS_FILE).read_bytes()).hexdigest() for n in ("local", "ray")]
    assert digest[0] == digest[1]
