"""Executors for the expensive stages: the greedy search's candidate evaluations and the label shards.

An executor is chosen once, by name, from :data:`EXECUTORS` (``PoolConfig.executor``, ``LabelConfig.executor``),
and the stages use only its small interface, the same for every executor:

- ``executor.evaluator(requests, reuse_prefix)``: an object with
  :class:`~pudding.pool.evaluator.CandidateEvaluator`'s interface (``evaluate(sets)``, ``stats``,
  ``total_blocks``) for one greedy search;
- ``executor.map(function, jobs)``: yields ``(job index, function(scorer, *job))`` for every job, in any order;
- ``executor.model_config()``: the config of the model the replicas hold, for the stage's fingerprint check.

:class:`LocalExecutor` runs everything in this process on one model; :class:`RayExecutor` on Ray actors.

Each Ray actor loads one replica of the model and scores whatever it is sent. The driver keeps everything
that must be sequential and checkpointed (the greedy steps, the shard files), so checkpoints and resume
work exactly as with the local executor, and the results are identical: every omission set and every
shard is computed by the same code on the same inputs, only on another process.

- Search: :class:`RayCandidateEvaluator` has the interface of :class:`~pudding.pool.evaluator.CandidateEvaluator`;
  one greedy step's candidate sets are split across the actors so that each runs about as many blocks
  (:func:`balanced_split`).
- Labels: :func:`ray_map` sends each missing shard, with the function that labels it, to the next free
  actor.

Cluster: ``ray.init(address=...)`` is called with ``address`` (``None`` starts a local cluster; ``"auto"``
joins the one this machine belongs to; ``"ray://head:10001"`` a remote one). Each actor asks for
``gpus_per_actor`` GPUs (0 on CPU machines), so on a node with 8 GPUs and ``gpus_per_actor=1`` eight
replicas run side by side, and Ray places actors across nodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.extras import require
from pudding.core.fields import (
    EXECUTOR_FIELD,
    RAY_ACTORS_FIELD,
    RAY_ADDRESS_FIELD,
    RAY_GPUS_FIELD,
    QuantizationFields,
)
from pudding.core.load import load_config, load_model
from pudding.core.omit import OmissionSet
from pudding.core.quantize import check_quantized
from pudding.core.score import ChoiceScore, LikelihoodScorer, Request
from pudding.pool.evaluator import CandidateEvaluator, ReuseStats, run_cost


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run: the cluster address, the number of actors, and GPUs per actor."""

    address: str | None = None
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0


def _ray():
    return require("ray", "ray")


AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"


def ray_init_kwargs(settings: RaySettings) -> dict:
    """The ``ray.init`` arguments: no dashboard (an HTTP server we do not need), driver logs kept quiet."""
    return {"address": settings.address, "ignore_reinit_error": True, "log_to_driver": False,
            "include_dashboard": False}


def check_local_cluster_is_guarded(settings: RaySettings, environ=os.environ) -> None:
    """Refuse to start a local cluster that anyone on the network could use.

    A local Ray cluster cannot be confined to loopback: Ray deliberately rewrites a loopback node address
    to the machine's network IP (``ray._private.services.resolve_ip_for_localhost``), and its gRPC servers
    listen on every interface. What keeps other machines out is Ray's token authentication, on by default
    since Ray 2.52; we refuse to start a cluster where it was switched off. Joining an existing cluster
    (``--ray-address``) leaves its security to whoever runs it.
    """
    mode = environ.get(AUTH_MODE_VARIABLE)
    if settings.address is None and mode is not None and mode.lower() != "token":
        raise ConfigError(f"{AUTH_MODE_VARIABLE}={mode}: a local Ray cluster listens on this machine's network "
                          "interfaces, and pudding starts one only with token authentication; unset "
                          f"{AUTH_MODE_VARIABLE} (or set it to 'token'), or join a cluster with --ray-address")


def init_ray(settings: RaySettings):
    ray = _ray()
    if not ray.is_initialized():
        check_local_cluster_is_guarded(settings)
        ray.init(**ray_init_kwargs(settings))
    return ray


class _Worker:
    """One model replica; methods run inside a Ray actor."""

    def __init__(self, spec: str, max_batch_tokens: int, max_length: int | None, threads: int | None = None,
                 quantize: str = "none", quantize_head: bool = False, quantize_skip: tuple[str, ...] = ()):
        import torch

        from pudding.core.load import load_model
        from pudding.core.score import LikelihoodScorer

        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_model(spec, quantize=quantize, quantize_head=quantize_head,
                                      quantize_skip=quantize_skip)
        self.scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=max_batch_tokens, max_length=max_length)
        self.evaluator = None

    def set_requests(self, requests: list[Request], reuse_prefix: bool) -> int:
        from pudding.pool.evaluator import CandidateEvaluator

        self.evaluator = CandidateEvaluator(self.scorer, requests, reuse_prefix=reuse_prefix)
        return self.evaluator.total_blocks

    def evaluate(self, omissions: list[OmissionSet]) -> tuple[list[list[ChoiceScore]], int, int]:
        before = (self.evaluator.stats.blocks_run, self.evaluator.stats.blocks_without_reuse)
        scores = self.evaluator.evaluate(omissions)
        stats = self.evaluator.stats
        return scores, stats.blocks_run - before[0], stats.blocks_without_reuse - before[1]

    def run(self, function: Callable, *args):
        """``function(scorer, *args)`` on this replica. The function travels by reference (a module-level
        function), so this worker imports no pipeline stage itself."""
        return function(self.scorer, *args)


def start_workers(settings: RaySettings, spec: str, max_batch_tokens: int, max_length: int | None, *,
                  quantize: str = "none", quantize_head: bool = False, quantize_skip: tuple[str, ...] = ()) -> list:
    """``settings.actors`` Ray actors, each holding a replica of ``spec`` (quantized as ``quantize`` says)."""
    if settings.actors < 1:
        raise ConfigError(f"need at least one Ray actor, got {settings.actors}")
    ray = init_ray(settings)
    actor = ray.remote(num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor)(_Worker)
    threads = max(1, int(settings.cpus_per_actor))
    return [actor.remote(spec, max_batch_tokens, max_length, threads, quantize, quantize_head, quantize_skip)
            for _ in range(settings.actors)]


class RayCandidateEvaluator:
    """:class:`~pudding.pool.evaluator.CandidateEvaluator`'s interface, each call's sets split over actors."""

    def __init__(self, workers: list, requests: Sequence[Request], reuse_prefix: bool = True):
        ray = _ray()
        self.workers = workers
        self.n_requests = len(requests)
        totals = ray.get([w.set_requests.remote(list(requests), reuse_prefix) for w in workers])
        self.total_blocks = totals[0]
        self.stats = ReuseStats()

    def evaluate(self, omissions: Sequence[OmissionSet]) -> list[list[ChoiceScore]]:
        ray = _ray()
        omissions = list(omissions)
        parts = [part for part in balanced_split(omissions, len(self.workers), self.total_blocks) if part]
        calls = [w.evaluate.remote([omissions[i] for i in part]) for w, part in zip(self.workers, parts)]
        results: list = [None] * len(omissions)
        for part, (scores, run, without) in zip(parts, ray.get(calls)):
            for index, score in zip(part, scores):
                results[index] = score
            self.stats.blocks_run += run
            self.stats.blocks_without_reuse += without
        return results


def balanced_split(omissions: Sequence[OmissionSet], workers: int, total_blocks: int) -> list[list[int]]:
    """The indices of ``omissions`` each of ``workers`` scores, so that each runs about as many blocks.

    With prefix reuse a greedy step's candidate costs the blocks from its own block on (:func:`run_cost`), so
    contiguous chunks would give the actor with the early blocks most of the work (measured on SmolLM2: one of
    two actors idle for a third of each step). Longest first, each to the least-loaded worker; each list stays
    in input order.
    """
    base = tuple(set.intersection(*map(set, omissions))) if omissions else ()
    costs = [run_cost(o, base, total_blocks) for o in omissions]
    loads, parts = [0] * workers, [[] for _ in range(workers)]
    for index in sorted(range(len(omissions)), key=lambda i: (-costs[i], i)):
        lightest = loads.index(min(loads))
        loads[lightest] += costs[index]
        parts[lightest].append(index)
    return [sorted(part) for part in parts]


def ray_map(workers: list, function: Callable, jobs: list[tuple]):
    """Yield (job index, ``function(scorer, *job)``) as actors finish; each actor runs one job at a time."""
    ray = _ray()
    pending = {}
    queue = list(enumerate(jobs))
    free = list(workers)
    while queue or pending:
        while queue and free:
            index, job = queue.pop(0)
            worker = free.pop()
            pending[worker.run.remote(function, *job)] = (index, worker)
        [done], _ = ray.wait(list(pending), num_returns=1)
        index, worker = pending.pop(done)
        free.append(worker)
        yield index, ray.get(done)


# --- the executor interface -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelReplica:
    """The model every replica loads and how it scores; the same on every executor, so the results are too."""

    spec: str
    max_batch_tokens: int
    max_length: int | None
    quantize: str = "none"
    quantize_head: bool = False
    quantize_skip: tuple[str, ...] = ()

    def scorer(self, model=None, tokenizer=None) -> LikelihoodScorer:
        """A scorer on ``model`` (checked to be quantized as declared), or on the model loaded from ``spec``."""
        if model is None:
            model, tokenizer = load_model(self.spec, quantize=self.quantize, quantize_head=self.quantize_head,
                                          quantize_skip=self.quantize_skip)
        else:  # the stage records self.quantize
            check_quantized(model, self.quantize, self.quantize_head, self.quantize_skip)
        return LikelihoodScorer(model, tokenizer, max_batch_tokens=self.max_batch_tokens, max_length=self.max_length)


class LocalExecutor:
    """Everything in this process, on one model."""

    def __init__(self, scorer: LikelihoodScorer):
        self.scorer = scorer

    @classmethod
    def start(cls, replica: ModelReplica, settings: RaySettings, *, model=None, tokenizer=None) -> LocalExecutor:
        """Load ``replica`` now (or use ``model``, already loaded): the stage checks it before any work."""
        return cls(replica.scorer(model, tokenizer))

    def model_config(self):
        return self.scorer.model.config

    def evaluator(self, requests: Sequence[Request], reuse_prefix: bool = True) -> CandidateEvaluator:
        return CandidateEvaluator(self.scorer, requests, reuse_prefix=reuse_prefix)

    def map(self, function: Callable, jobs: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """``(i, function(scorer, *jobs[i]))`` in job order, each computed only when asked for."""
        for index, job in enumerate(jobs):
            yield index, function(self.scorer, *job)


class RayExecutor:
    """Ray actors, each with a replica of the model; started on first use, so a stage that refuses to resume
    (another job's checkpoints, say) starts no cluster."""

    def __init__(self, replica: ModelReplica, settings: RaySettings):
        self.replica, self.settings = replica, settings
        self._workers: list | None = None

    @classmethod
    def start(cls, replica: ModelReplica, settings: RaySettings, *, model=None, tokenizer=None) -> RayExecutor:
        """``model`` is not used: every actor loads ``replica.spec`` itself."""
        return cls(replica, settings)

    @property
    def workers(self) -> list:
        if self._workers is None:
            r = self.replica
            self._workers = start_workers(self.settings, r.spec, r.max_batch_tokens, r.max_length,
                                          quantize=r.quantize, quantize_head=r.quantize_head,
                                          quantize_skip=r.quantize_skip)
        return self._workers

    def model_config(self):
        return load_config(self.replica.spec)  # the actors load the model; the driver only reads its config

    def evaluator(self, requests: Sequence[Request], reuse_prefix: bool = True) -> RayCandidateEvaluator:
        return RayCandidateEvaluator(self.workers, requests, reuse_prefix=reuse_prefix)

    def map(self, function: Callable, jobs: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        """``(i, function(scorer, *jobs[i]))`` as the actors finish them (no cluster is started for no jobs)."""
        if jobs:
            yield from ray_map(self.workers, function, list(jobs))


Executor = LocalExecutor | RayExecutor

EXECUTORS: dict[str, type[LocalExecutor] | type[RayExecutor]] = {"local": LocalExecutor, "ray": RayExecutor}
"""The executors by the name a configuration gives (``executor="local"``)."""


def check_executor(name: str) -> None:
    """ConfigError unless ``name`` is in :data:`EXECUTORS`."""
    if name not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}, got {name!r}")


def start_executor(name: str, replica: ModelReplica, settings: RaySettings | None = None, *, model=None,
                   tokenizer=None) -> Executor:
    """The executor ``name`` for ``replica`` (``settings``: the Ray cluster, used by ``ray`` only).

    ``model`` and ``tokenizer``, if given, are the already loaded model for the local executor.
    """
    check_executor(name)
    return EXECUTORS[name].start(replica, settings or RaySettings(), model=model, tokenizer=tokenizer)


@dataclass(frozen=True, kw_only=True)
class ExecutorFields(QuantizationFields):
    """The quantization settings plus ``--executor`` and the Ray settings: the base of every config whose stage can
    spread its scoring over Ray actors (candidates, label, reproduce), declared and validated here once."""

    executor: str = field(default="local", metadata=EXECUTOR_FIELD)
    ray_address: str | None = field(default=None, metadata=RAY_ADDRESS_FIELD)
    ray_actors: int = field(default=2, metadata=RAY_ACTORS_FIELD)
    ray_gpus_per_actor: float = field(default=0.0, metadata=RAY_GPUS_FIELD)

    def __post_init__(self):
        check_executor(self.executor)
        super().__post_init__()

    @property
    def execution(self) -> dict:
        """The executor settings as keyword arguments of another stage's config (``LabelConfig(**execution)``)."""
        return {"executor": self.executor, "ray_address": self.ray_address, "ray_actors": self.ray_actors,
                "ray_gpus_per_actor": self.ray_gpus_per_actor}

    @property
    def ray_settings(self) -> RaySettings:
        """The settings as ``start_executor``'s :class:`RaySettings`."""
        return RaySettings(self.ray_address, self.ray_actors, self.ray_gpus_per_actor)
