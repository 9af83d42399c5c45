"""Stage 5 entry point: build a pool of candidate omission sets, or the static baselines, as one artifact.

``build_pool`` runs the greedy search once per (calibration task, objective), deduplicates identical sets,
and saves a :class:`CandidatePool`. ``build_baselines`` produces the same artifact type for the static
methods (SLEB = greedy with ``ppl``; Shortened-LLaMA PPL and Taylor+; ShortGPT), so later stages treat
both alike. Each search checkpoints after every step under ``run_dir`` and resumes there.

The paper chose its ten sets by hand; here the pool is every distinct set the searches find.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pudding.baselines import least_important
from pudding.errors import ConfigError
from pudding.load import DEFAULT_MODEL, load_config, load_model, model_fingerprint, model_name
from pudding.omit import OmissionSet, validate_omission
from pudding.provenance import atomic_write_json, locks_output, provenance
from pudding.quantize import check_quantization, quantize_identity
from pudding.score import LikelihoodScorer
from pudding.search import CandidateEvaluator, check_k, get_objective, greedy_search, removable_blocks
from pudding.tasks import MCDoc, get_task, load_docs

POOL_FILE = "pool.json"
POOL_FORMAT = "pudding.pool/1"
PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq")


@dataclass(frozen=True)
class SetSource:
    """Where one candidate set came from, and what finding it cost."""

    method: str  # "greedy" or a one-shot method of pudding.baselines
    task: str | None
    objective: str | None
    removal_order: list[int]
    trajectory: list[float]  # loss before and after each removal (greedy) or block importances (one-shot)
    sample_ids: list[str]
    seconds: float


@dataclass(frozen=True)
class PoolEntry:
    """A distinct omission set and every search that found it."""

    blocks: OmissionSet
    sources: tuple[SetSource, ...]
    # A depth ladder holds the same search at several k: its names carry the k ("arc_easy-tl-k3") to stay distinct.
    depth_in_name: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        source = self.sources[0]
        name = "-".join(p for p in (source.method if source.method != "greedy" else None, source.task,
                                    source.objective) if p)
        return f"{name}-k{self.k}" if self.depth_in_name and self.blocks else name

    @property
    def k(self) -> int:
        """Blocks this set skips (its depth in a ladder)."""
        return len(self.blocks)


@dataclass(frozen=True)
class CandidatePool:
    """Omission sets for one model, with the model's fingerprint so mismatched models can be refused."""

    sets: tuple[PoolEntry, ...]
    model: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory/pool.json`` atomically and return its path."""
        data = {"format": POOL_FORMAT, "model": self.model, "config": self.config, "provenance": self.provenance,
                "sets": [{"blocks": list(e.blocks), "name": e.name, "sources": [asdict(s) for s in e.sources]}
                         for e in self.sets]}
        return atomic_write_json(Path(directory) / POOL_FILE, data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CandidatePool:
        """Load a pool folder (or its pool.json); unknown keys are dropped with a warning."""
        path = Path(directory)
        path = path / POOL_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
            if data.get("format") != POOL_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {POOL_FORMAT!r}")
            model = data["model"]
            total = _block_count(model)
            ladder = isinstance(data.get("config"), dict) and "ladder" in data["config"]
            sets = tuple(PoolEntry(_stored_blocks(i, s, total), tuple(SetSource(**_known(SetSource, src))
                                                                     for src in s["sources"]), ladder)
                         for i, s in enumerate(data["sets"]))
        except FileNotFoundError:
            raise ConfigError(f"no candidate pool at {path}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a valid candidate pool: {error}") from None
        return cls(sets, model, data.get("config", {}), data.get("provenance", {}))

    def fingerprint(self) -> str:
        """A short hash of what later stages depend on: the model's fingerprint and the sets, in order."""
        key = json.dumps({"model": self.model.get("fingerprint"), "sets": [list(e.blocks) for e in self.sets]},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def check_model(self, config) -> None:
        """ConfigError if ``config`` is not the model this pool was built for."""
        fingerprint = model_fingerprint(config)
        if fingerprint != self.model.get("fingerprint"):
            raise ConfigError(f"this pool was built for {self.model.get('name')} {self.model.get('fingerprint')}, "
                              f"not for a model with fingerprint {fingerprint}")


def _block_count(model) -> int | None:
    """The pool model's block count, if its fingerprint records one."""
    if not isinstance(model, dict):
        raise ValueError(f"'model' must be an object, got {type(model).__name__}")
    fingerprint = model.get("fingerprint")
    count = fingerprint.get("num_blocks") if isinstance(fingerprint, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _stored_blocks(index: int, stored: dict, total: int | None) -> OmissionSet:
    """Set ``index``'s blocks as saved, checked now: an edited or corrupt pool.json would otherwise pass
    until generation, far from its cause. Kept in their saved order, which the pool's fingerprint hashes."""
    blocks, name = stored["blocks"], stored.get("name", "?")
    if not isinstance(blocks, list):
        raise ConfigError(f"set {index} ({name}): blocks must be a list of block indices, got "
                          f"{type(blocks).__name__}")
    try:
        validate_omission(blocks, total)
    except ConfigError as error:
        raise ConfigError(f"set {index} ({name}): {error}") from None
    return tuple(blocks)


def _known(cls, data: dict) -> dict:
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"ignoring unknown keys {unknown} in {cls.__name__}", stacklevel=3)
    missing = sorted(names - set(data))
    if missing:
        raise KeyError(f"missing keys {missing}")
    return {k: v for k, v in data.items() if k in names}


def deduplicate(found: list[tuple[OmissionSet, SetSource]]) -> tuple[PoolEntry, ...]:
    """One entry per distinct set, in order of first appearance, listing every source that found it."""
    merged: dict[OmissionSet, list[SetSource]] = {}
    for blocks, source in found:
        merged.setdefault(tuple(sorted(blocks)), []).append(source)
    return tuple(PoolEntry(blocks, tuple(sources)) for blocks, sources in merged.items())


def shrink_source(source: SetSource, k: int, removable: list[int]) -> SetSource:
    """What the same search finds at a smaller ``k``, without running it again.

    A greedy search's first ``k`` removals *are* the ``k``-block search: each step depends only on the blocks
    removed before it. A one-shot method removes the ``k`` least important blocks of the same importance
    scores (its ``trajectory``, one per removable block), picked as :func:`rank_blocks` picks them.
    ``seconds`` stays the cost of the original, larger search.
    """
    if source.method in ("greedy", "sleb"):
        return replace(source, removal_order=source.removal_order[:k], trajectory=source.trajectory[:k + 1])
    if len(source.trajectory) != len(removable):
        raise ConfigError(f"{source.method}: {len(source.trajectory)} importance scores for "
                          f"{len(removable)} removable blocks; the pool does not match its configuration")
    return replace(source, removal_order=list(least_important(dict(zip(removable, source.trajectory)), k)))


def shrink_pool(pool: CandidatePool, k: int) -> CandidatePool:
    """The pool (or baselines) the same searches give at a smaller ``k``; sets that coincide are merged.

    Exact, not an approximation (see :func:`shrink_source`), so ``pudding reproduce --k 3`` reuses the
    k=6 searches instead of repeating them.
    """
    found_k = pool.config.get("k")
    if not isinstance(found_k, int) or not 1 <= k <= found_k:
        raise ConfigError(f"a pool searched at k={found_k} can only be shrunk to 1 <= k <= {found_k}, not k={k}")
    if k == found_k:
        return pool
    removable = removable_blocks(pool.model["fingerprint"]["num_blocks"], tuple(pool.config.get("barriers", (1, 1))))
    shrunk = [shrink_source(source, k, removable) for entry in pool.sets for source in entry.sources]
    sets = deduplicate([(tuple(source.removal_order), source) for source in shrunk])
    config = {**pool.config, "k": k, "derived_from": {"k": found_k, "pool": pool.fingerprint(),
                                                      "provenance": pool.provenance}}
    return CandidatePool(sets, pool.model, config, provenance())


DENSE_SOURCE = SetSource("dense", None, None, [], [], [], 0.0)


def ladder_pool(pools: Sequence[CandidatePool], depths: Sequence[int]) -> CandidatePool:
    """A depth ladder: every search's and baseline's set at each of ``depths``, as one pool.

    Each set is exact (:func:`shrink_source`): a greedy search's (and SLEB's) first ``k`` removals, a one-shot
    baseline's ``k`` least important blocks. Depth 0 adds the dense model as a set of its own, the reference
    of tolerance routing (:mod:`pudding.adaptive`). Sets are ordered by depth, then as found; a set found by
    several searches at one depth is one entry with every source. A greedy search shorter than the deepest
    rung is refused: extend it first by rerunning it with the larger ``--k`` and the same ``--run-dir``
    (its checkpoint resumes; nothing already searched is recomputed).

    >>> ladder_pool([pool, baselines], (3, 6, 9))  # doctest: +SKIP
    """
    if not pools or not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
        raise ConfigError(f"a ladder needs at least one pool and depths that are integers >= 0, got {list(depths)}")
    rungs = sorted(set(depths))
    model = pools[0].model
    found: list[tuple[OmissionSet, SetSource]] = []
    for pool in pools:
        if pool.model.get("fingerprint") != model.get("fingerprint"):
            raise ConfigError(f"the pools to ladder are of different models: {model.get('fingerprint')} and "
                              f"{pool.model.get('fingerprint')}")
        if "ladder" in pool.config:
            raise ConfigError("a ladder is built from the searched pools, not from another ladder")
        removable = removable_blocks(model["fingerprint"]["num_blocks"], tuple(pool.config.get("barriers", (1, 1))))
        for entry in pool.sets:
            for source in entry.sources:
                found += [(tuple(s.removal_order), s) for s in _rungs(source, rungs, removable)]
    if 0 in rungs:
        found.insert(0, ((), DENSE_SOURCE))
    entries = tuple(replace(e, depth_in_name=True) for e in sorted(deduplicate(found), key=lambda e: e.k))
    config = {"k": None, "barriers": pools[0].config.get("barriers", [1, 1]),
              "ladder": {"depths": rungs, "from": [{"pool": p.fingerprint(), "k": p.config.get("k"),
                                                    "config": p.config, "provenance": p.provenance} for p in pools]}}
    return CandidatePool(entries, model, config, provenance())


def _rungs(source: SetSource, rungs: list[int], removable: list[int]) -> list[SetSource]:
    """``source`` at every positive depth of ``rungs``; ConfigError naming how to extend a short search."""
    deepest = max(rungs)
    if deepest >= len(removable):
        raise ConfigError(f"depth {deepest} leaves fewer than one of the {len(removable)} removable blocks")
    if source.method in ("greedy", "sleb") and len(source.removal_order) < deepest:
        what = "/".join(p for p in (source.method, source.task, source.objective) if p)
        raise ConfigError(f"the {what} search stopped at k={len(source.removal_order)}, short of depth {deepest}; "
                          f"extend it with `pudding {'baselines' if source.method == 'sleb' else 'candidates'} "
                          f"--k {deepest}` and its --run-dir (the checkpoint resumes), then ladder that pool")
    return [shrink_source(source, k, removable) for k in rungs if k > 0]


@dataclass(frozen=True)
class PoolConfig:
    """Settings of ``pudding candidates``.

    Attributes:
        model: model spec (see :func:`pudding.load.load_model`).
        tasks: calibration tasks; one search per task and objective.
        objectives: search objectives (``tl``, ``margin``, ``ppl``).
        k: blocks to remove.
        samples: calibration documents per task (a fixed, seeded sample of the calibration split).
        max_length: tokens per request; longer ones keep their last ``max_length`` tokens.
        barriers: blocks protected at the start and at the end.
        max_batch_tokens: padded tokens per forward pass.
        reuse_prefix: reuse the dense prefix across candidates (exact; off only to measure its effect).
        run_dir: checkpoints, one per search; a rerun resumes from them.
        out: folder the pool artifact is written to.
        executor: ``local``, or ``ray`` to spread each step's candidates over Ray actors (identical results).
        ray_address, ray_actors: the Ray cluster (``None`` starts a local one) and the number of replicas.
        quantize: ``none`` or ``int8`` (:mod:`pudding.quantize`): the model every search scores with; part of
            each checkpoint's identity when it is not ``none``.
        quantize_head: quantize the LM head too.
    """

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = PAPER_TASKS
    objectives: tuple[str, ...] = ("tl", "margin")
    k: int = 6
    samples: int = 16
    max_length: int = 256
    barriers: tuple[int, int] = (1, 1)
    max_batch_tokens: int = 512
    reuse_prefix: bool = True
    run_dir: str = "runs/candidates"
    out: str = "runs/pool"
    progress: bool = True
    executor: str = "local"
    ray_address: str | None = None
    ray_actors: int = 2
    ray_gpus_per_actor: float = 0.0
    quantize: str = "none"
    quantize_head: bool = False

    def __post_init__(self):
        if self.executor not in ("local", "ray"):
            raise ConfigError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        check_quantization(self.quantize, self.quantize_head)
        for name, value in (("tasks", self.tasks), ("objectives", self.objectives)):
            items = value.split(",") if isinstance(value, str) else list(value)
            items = tuple(dict.fromkeys(i.strip() for i in items if i and i.strip()))
            if not items:
                raise ConfigError(f"no {name} given")
            object.__setattr__(self, name, items)
        for task in self.tasks:
            get_task(task)
        for objective in self.objectives:
            get_objective(objective)
        for name in ("k", "samples", "max_length", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        object.__setattr__(self, "barriers", tuple(self.barriers))


def calibration_docs(task: str, samples: int) -> list[MCDoc]:
    """The first ``samples`` calibration documents of ``task``; ConfigError if it has fewer."""
    docs = load_docs(task, "calibration", limit=samples)
    if len(docs) < samples:
        raise ConfigError(f"task {task!r} has only {len(docs)} calibration examples, fewer than the "
                          f"{samples} asked for; lower --samples")
    return docs


def _search_identity(config: PoolConfig, fingerprint: dict, task: str, objective: str, docs: list[MCDoc]) -> dict:
    ids = [d.doc_id for d in docs]
    # No k: a search's first j steps do not depend on k, so a k=6 checkpoint resumes into a k=9 search.
    # The quantization adds keys only when there is one: fp32 checkpoints written before it existed resume.
    return {"model": fingerprint, "task": task, "objective": objective,
            "barriers": list(config.barriers), "max_length": config.max_length,
            "samples_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16],
            **quantize_identity(config.quantize, config.quantize_head)}


def _run_search(config: PoolConfig, scorer, fingerprint, task: str, objective_name: str, docs) -> SetSource:
    """One greedy search; ``scorer`` is a LikelihoodScorer, or the list of Ray workers for ``executor=ray``."""
    objective = get_objective(objective_name)
    requests = objective.requests(docs)
    if config.executor == "ray":
        from pudding.distributed import RayCandidateEvaluator

        evaluator = RayCandidateEvaluator(scorer, requests, reuse_prefix=config.reuse_prefix)
    else:
        evaluator = CandidateEvaluator(scorer, requests, reuse_prefix=config.reuse_prefix)
    checkpoint = Path(config.run_dir) / f"{task}-{objective_name}.json"
    result = greedy_search(evaluator, lambda scores: objective.loss(docs, scores), config.k,
                           barriers=config.barriers, checkpoint=checkpoint,
                           identity=_search_identity(config, fingerprint, task, objective_name, docs),
                           progress=f"{task}/{objective_name}" if config.progress else False)
    return SetSource("greedy", task, objective_name, result.removal_order, result.trajectory,
                     [d.doc_id for d in docs], round(result.seconds, 2))


def _prepare(config: PoolConfig) -> tuple[dict, dict[str, list[MCDoc]]]:
    """Validate everything that can fail before the slow part: model, k, and every task's sample count."""
    model_config = load_config(config.model)
    check_k(config.k, model_config.num_hidden_layers, config.barriers)
    data_tasks = {get_objective(o).text_task or t for t in config.tasks for o in config.objectives}
    docs = {t: calibration_docs(t, config.samples) for t in sorted(data_tasks)}
    return model_fingerprint(model_config), docs


def _make_scorer(config: PoolConfig):
    if config.executor == "ray":
        from pudding.distributed import RaySettings, start_workers

        return start_workers(RaySettings(config.ray_address, config.ray_actors, config.ray_gpus_per_actor),
                             config.model, config.max_batch_tokens, config.max_length, quantize=config.quantize,
                             quantize_head=config.quantize_head)
    model, tokenizer = load_model(config.model, quantize=config.quantize, quantize_head=config.quantize_head)
    return LikelihoodScorer(model, tokenizer, max_batch_tokens=config.max_batch_tokens, max_length=config.max_length)


@locks_output("run_dir", "out")
def build_pool(config: PoolConfig) -> CandidatePool:
    """Run every (task, objective) search, deduplicate, and save the pool to ``config.out``."""
    fingerprint, docs = _prepare(config)
    scorer = _make_scorer(config)
    found = []
    for task in config.tasks:
        for objective in config.objectives:
            data = docs[get_objective(objective).text_task or task]
            source = _run_search(config, scorer, fingerprint, task, objective, data)
            found.append((tuple(source.removal_order), source))
    pool = CandidatePool(deduplicate(found), {"spec": config.model, "name": model_name(config.model),
                                               "fingerprint": fingerprint}, asdict(config), provenance())
    pool.save_pretrained(config.out)
    return pool


@locks_output("run_dir", "out")
def build_baselines(config: PoolConfig, methods: tuple[str, ...] = ("sleb", "shortened_ppl", "taylor", "shortgpt"),
                    ) -> CandidatePool:
    """The static baselines at ``config.k`` on the PPL calibration text, saved as a pool to ``config.out``.

    FinerCut's set names sub-layers, so it is saved beside the pool, in ``subblock_sets.json``
    (:mod:`pudding.finercut`), and pool.json holds whole-block sets only (none if FinerCut is all that ran).
    """
    from pudding.baselines import ONE_SHOT_METHODS, rank_blocks

    if config.executor != "local":
        raise ConfigError("the baselines run on the local executor only (the one-shot methods need gradients)")
    from pudding.finercut import SUBBLOCK_METHODS

    unknown = [m for m in methods if m != "sleb" and m not in ONE_SHOT_METHODS and m not in SUBBLOCK_METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown baseline methods {unknown}; known: sleb, {', '.join(ONE_SHOT_METHODS)}, "
                          f"{', '.join(SUBBLOCK_METHODS)}")
    if "taylor" in methods and config.quantize != "none":
        raise ConfigError("the taylor baseline needs the gradients of the blocks' weights, which int8 layers do not "
                          "have; drop it from --methods or run the baselines with --quantize none")
    ppl = get_objective("ppl")
    fingerprint, _ = _prepare(PoolConfig(**{**asdict(config), "tasks": ("boolq",), "objectives": ("ppl",)}))
    docs = calibration_docs(ppl.text_task, config.samples)
    model, tokenizer = load_model(config.model, quantize=config.quantize, quantize_head=config.quantize_head)
    scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=config.max_batch_tokens, max_length=config.max_length)
    found, subblock = [], []
    for method in methods:
        if method in SUBBLOCK_METHODS:  # sets that name sub-layers go to their own file, not pool.json
            subblock.append(_run_finercut(config, scorer, fingerprint, docs))
            continue
        if method == "sleb":
            source = _run_search(config, scorer, fingerprint, "sleb", "ppl", docs)
            source = SetSource("sleb", None, "ppl", *[getattr(source, f) for f in
                                                      ("removal_order", "trajectory", "sample_ids", "seconds")])
        else:
            ranking = rank_blocks(method, scorer, ppl.requests(docs), config.k, config.barriers)
            source = SetSource(method, None, None, list(ranking.blocks),
                               [ranking.importance[b] for b in sorted(ranking.importance)],
                               [d.doc_id for d in docs], round(ranking.seconds, 2))
        found.append((tuple(source.removal_order), source))
    pool = CandidatePool(tuple(PoolEntry(validate_omission(b, fingerprint["num_blocks"]), (s,)) for b, s in found),
                         {"spec": config.model, "name": model_name(config.model), "fingerprint": fingerprint},
                         {**asdict(config), "methods": [m for m in methods if m not in SUBBLOCK_METHODS]},
                         provenance())
    if found:
        pool.save_pretrained(config.out)
    if subblock:
        from pudding.finercut import save_subblock_sets

        save_subblock_sets(config.out, subblock, pool.model, {**asdict(config), "methods": ["finercut"]})
    return pool


def _run_finercut(config: PoolConfig, scorer, fingerprint: dict, docs: list[MCDoc]):
    """FinerCut at ``config.k`` blocks' budget on the same calibration text and barriers as the other baselines."""
    from pudding.finercut import run_finercut

    return run_finercut(scorer, get_objective("ppl").requests(docs), config.k, barriers=config.barriers,
                        checkpoint=Path(config.run_dir) / "finercut-js.json",
                        identity=_search_identity(config, fingerprint, "finercut", "js", docs),
                        sample_ids=[d.doc_id for d in docs], progress="finercut" if config.progress else False)
