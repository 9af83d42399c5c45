"""Ray executor for the expensive stages: the greedy search's candidate evaluations and the label shards.

Each Ray actor loads one replica of the model and scores whatever it is sent. The driver keeps everything
that must be sequential and checkpointed (the greedy steps, the shard files), so checkpoints and resume
work exactly as with the local executor, and the results are identical: every omission set and every
shard is computed by the same code on the same inputs, only on another process.

- Search: :class:`RayCandidateEvaluator` has the interface of :class:`~pudding.pool.evaluator.CandidateEvaluator`;
  one greedy step's candidate sets are split evenly across the actors.
- Labels: :func:`ray_map` sends each missing shard, with the function that labels it, to the next free
  actor.

Cluster: ``ray.init(address=...)`` is called with ``address`` (``None`` starts a local cluster; ``"auto"``
joins the one this machine belongs to; ``"ray://head:10001"`` a remote one). Each actor asks for
``gpus_per_actor`` GPUs (0 on CPU machines), so on a node with 8 GPUs and ``gpus_per_actor=1`` eight
replicas run side by side, and Ray places actors across nodes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pudding.core.errors import ConfigError
from pudding.core.omit import OmissionSet
from pudding.core.score import ChoiceScore, Request
from pudding.pool.evaluator import ReuseStats


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run: the cluster address, the number of actors, and GPUs per actor."""

    address: str | None = None
    actors: int = 2
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'pudding[ray]'") from None
    return ray


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
                 quantize: str = "none", quantize_head: bool = False):
        import torch

        from pudding.core.load import load_model
        from pudding.core.score import LikelihoodScorer

        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_model(spec, quantize=quantize, quantize_head=quantize_head)
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
                  quantize: str = "none", quantize_head: bool = False) -> list:
    """``settings.actors`` Ray actors, each holding a replica of ``spec`` (quantized as ``quantize`` says)."""
    if settings.actors < 1:
        raise ConfigError(f"need at least one Ray actor, got {settings.actors}")
    ray = init_ray(settings)
    actor = ray.remote(num_cpus=settings.cpus_per_actor, num_gpus=settings.gpus_per_actor)(_Worker)
    threads = max(1, int(settings.cpus_per_actor))
    return [actor.remote(spec, max_batch_tokens, max_length, threads, quantize, quantize_head)
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
        n = len(self.workers)
        # Contiguous chunks keep the result order trivially equal to the input order.
        bounds = [round(i * len(omissions) / n) for i in range(n + 1)]
        chunks = [(w, omissions[a:b]) for w, a, b in zip(self.workers, bounds, bounds[1:]) if b > a]
        results = []
        for scores, run, without in ray.get([w.evaluate.remote(chunk) for w, chunk in chunks]):
            results.extend(scores)
            self.stats.blocks_run += run
            self.stats.blocks_without_reuse += without
        return results


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
