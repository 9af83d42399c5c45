"""The executor is chosen once, by name, from one registry; the search and the labels use only its interface."""

import hashlib

import pytest

from pudding.core.errors import ConfigError
from pudding.pool.evaluator import run_cost
from pudding.pool.executor import (
    EXECUTORS,
    LocalExecutor,
    ModelReplica,
    RayExecutor,
    RaySettings,
    balanced_split,
    check_executor,
    start_executor,
)
from pudding.pruning.candidates import PoolConfig, build_pool
from pudding.routing.labels import LABELS_FILE, LabelConfig, build_labels

from tiny import NUM_LAYERS


def test_an_unknown_executor_is_refused_by_every_config_with_the_known_ones():
    assert set(EXECUTORS) == {"local", "ray"}
    for make in (lambda: check_executor("dask"), lambda: PoolConfig(executor="dask"),
                 lambda: LabelConfig(pool="p", out="o", executor="dask")):
        with pytest.raises(ConfigError, match=r"executor must be one of 'local', 'ray', got 'dask'"):
            make()


def test_the_local_map_runs_each_job_when_asked_in_order():
    calls = []

    def job(scorer, x, y):
        calls.append((scorer, x, y))
        return x + y

    results = LocalExecutor("scorer").map(job, [(1, 2), (3, 4)])
    assert calls == []  # lazy: a crash after shard i leaves shards > i unscored, as the label resume expects
    assert next(results) == (0, 3) and calls == [("scorer", 1, 2)]
    assert list(results) == [(1, 7)]


def test_the_ray_executor_starts_no_cluster_until_it_has_work(tiny_dir):
    executor = start_executor("ray", ModelReplica(tiny_dir, 512, 256), RaySettings())
    assert isinstance(executor, RayExecutor)
    assert executor.model_config().num_hidden_layers == NUM_LAYERS  # read from the spec, as the actors load it
    assert list(executor.map(lambda scorer: 1, [])) == [] and executor._workers is None


class _Recording(LocalExecutor):
    """The local executor, counting what the stages ask of it."""

    calls: list = []

    def evaluator(self, requests, reuse_prefix=True):
        self.calls.append("evaluator")
        return super().evaluator(requests, reuse_prefix)

    def map(self, function, jobs):
        self.calls.append("map")
        return super().map(function, jobs)


def test_a_registered_executor_is_what_the_search_and_the_labels_use(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(EXECUTORS, "recording", _Recording)
    monkeypatch.setattr(_Recording, "calls", [])

    def pool(executor):
        return build_pool(PoolConfig(model=tiny_dir, tasks="piqa", objectives="tl,margin", k=2, samples=4,
                                     run_dir=str(tmp_path / f"run-{executor}"), out=str(tmp_path / f"pool-{executor}"),
                                     progress=False, executor=executor))

    local, recorded = pool("local"), pool("recording")
    assert _Recording.calls == ["evaluator", "evaluator"]  # one per search
    assert [e.blocks for e in recorded.sets] == [e.blocks for e in local.sets]
    assert [[s.trajectory for s in e.sources] for e in recorded.sets] == [[s.trajectory for s in e.sources]
                                                                          for e in local.sets]

    def labels(executor):
        build_labels(LabelConfig(pool=str(tmp_path / "pool-local"), out=str(tmp_path / f"out-{executor}"),
                                 tasks="piqa", samples=5, shard_size=2, run_dir=str(tmp_path / f"labels-{executor}"),
                                 progress=False, executor=executor))
        return hashlib.sha256((tmp_path / f"out-{executor}" / LABELS_FILE).read_bytes()).hexdigest()

    assert labels("recording") == labels("local")
    assert _Recording.calls[2:] == ["map"]


def _greedy_step(removed, total=30, barriers=(1, 1)):
    """A greedy step's candidate sets: the removed blocks plus each other removable block, in block order."""
    return [tuple(sorted((*removed, b))) for b in range(barriers[0], total - barriers[1]) if b not in removed]


def test_a_greedy_step_is_split_so_each_actor_runs_about_as_many_blocks():
    step = _greedy_step((22, 25))
    parts = balanced_split(step, 2, 30)
    assert sorted(i for part in parts for i in part) == list(range(len(step)))  # every set once
    assert all(part == sorted(part) for part in parts)

    def load(part):
        return sum(run_cost(step[i], (22, 25), 30) for i in part)

    # candidate b costs the blocks from b on, so the early half holds most of the work: a contiguous split
    # leaves one actor waiting; the balanced one is within one candidate's cost
    half = len(step) // 2
    contiguous = [load(range(half)), load(range(half, len(step)))]
    assert contiguous[0] > 2 * contiguous[1]
    balanced = [load(part) for part in parts]
    assert abs(balanced[0] - balanced[1]) <= max(run_cost(s, (22, 25), 30) for s in step)
    assert max(balanced) < 0.7 * max(contiguous)


def test_a_split_over_more_workers_than_sets_leaves_the_rest_idle():
    parts = balanced_split([(3,), (4,)], 4, 8)
    assert sorted(map(len, parts)) == [0, 0, 1, 1]
    assert balanced_split([], 2, 8) == [[], []]


def test_run_cost_counts_the_kept_blocks_from_where_the_set_starts():
    assert run_cost((2, 5), (5,), 8) == 4  # starts at block 2 from the pass without 5, runs 3, 4, 6 and 7
    assert run_cost((0, 5), (5,), 8) == 6  # block 0 saves nothing: the whole model without 0 and 5
