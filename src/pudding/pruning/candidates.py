"""The pruning stage's entry point: build a pool of candidate omission sets, or the static baselines, as one artifact.

``build_pool`` runs the greedy search once per (calibration task, objective), deduplicates identical sets,
and saves a :class:`CandidatePool`. ``build_baselines`` produces the same artifact type for the static
methods (SLEB = greedy with ``ppl``; Shortened-LLaMA PPL and Taylor+; ShortGPT), so later stages treat
both alike. Each search checkpoints after every step under ``run_dir`` and resumes there.

The paper chose its ten sets by hand; here the pool is every distinct set the searches find.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from pudding.core.errors import ConfigError
from pudding.core.load import DEFAULT_MODEL, load_config, load_model, model_fingerprint, model_name
from pudding.core.omit import check_k, validate_omission
from pudding.core.provenance import locks_output, provenance
from pudding.core.quantize import check_quantization, quantize_identity
from pudding.core.score import LikelihoodScorer
from pudding.core.tasks import PAPER_TASKS, MCDoc, get_task, load_docs
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource, deduplicate
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.search import get_objective, greedy_search


@dataclass(frozen=True)
class PoolConfig:
    """Settings of ``pudding candidates``.

    Attributes:
        model: model spec (see :func:`pudding.core.load.load_model`).
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
        quantize: ``none`` or ``int8`` (:mod:`pudding.core.quantize`): the model every search scores with; part of
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
        from pudding.pool.executor import RayCandidateEvaluator

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
        from pudding.pool.executor import RaySettings, start_workers

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
    (:mod:`pudding.pruning.finercut`), and pool.json holds whole-block sets only (none if FinerCut is all that ran).
    """
    from pudding.pruning.baselines import ONE_SHOT_METHODS, rank_blocks

    if config.executor != "local":
        raise ConfigError("the baselines run on the local executor only (the one-shot methods need gradients)")
    from pudding.pruning.finercut import SUBBLOCK_METHODS

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
        from pudding.pruning.finercut import save_subblock_sets

        save_subblock_sets(config.out, subblock, pool.model, {**asdict(config), "methods": ["finercut"]})
    return pool


def _run_finercut(config: PoolConfig, scorer, fingerprint: dict, docs: list[MCDoc]):
    """FinerCut at ``config.k`` blocks' budget on the same calibration text and barriers as the other baselines."""
    from pudding.pruning.finercut import run_finercut

    return run_finercut(scorer, get_objective("ppl").requests(docs), config.k, barriers=config.barriers,
                        checkpoint=Path(config.run_dir) / "finercut-js.json",
                        identity=_search_identity(config, fingerprint, "finercut", "js", docs),
                        sample_ids=[d.doc_id for d in docs], progress="finercut" if config.progress else False)
