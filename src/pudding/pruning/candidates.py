"""The pruning stage's entry point: build a pool of candidate omission sets, or the static baselines, as one artifact.

``build_pool`` runs the greedy search once per (calibration task, objective), deduplicates identical sets,
and saves a :class:`CandidatePool`. ``build_baselines`` produces the same artifact type for the static
methods (SLEB = greedy with ``ppl``; Shortened-LLaMA PPL and Taylor+; ShortGPT), so later stages treat
both alike. Each search checkpoints after every step under ``run_dir`` and resumes there.

The paper chose its ten sets by hand; here the pool is every distinct set the searches find. With
``granularity="sublayer"`` the searches remove single attention or MLP sub-layers, up to k blocks' worth of
parameters (:func:`pudding.pruning.search.sublayer_search`), and the pool is saved as ``pudding.pool/2``.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pudding.core.errors import ConfigError
from pudding.core.identity import require_identity
from pudding.core.load import DEFAULT_MODEL, load_config, model_fingerprint, model_name
from pudding.core.omit import check_k, validate_omission
from pudding.core.provenance import atomic_write_json, locks_output, provenance, read_json
from pudding.core.quantize import quantize_identity
from pudding.core.tasks import PAPER_TASKS, MCDoc, get_task, load_docs
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource, deduplicate
from pudding.pool.executor import (
    Executor,
    ExecutorFields,
    LocalExecutor,
    ModelReplica,
    start_executor,
)
from pudding.pruning.search import GRANULARITIES, get_objective, greedy_search, sublayer_search


@dataclass(frozen=True)
class PoolConfig(ExecutorFields):
    """Settings of ``pudding candidates`` (and ``baselines``); each field's help text is its documentation.

    ``quantize`` is part of each checkpoint's identity when it is not ``none``.
    """

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "'default', a .gguf file, a model folder or a hub id"})
    tasks: tuple[str, ...] = field(default=PAPER_TASKS, metadata={
        "help": "comma-separated calibration tasks; one search per task and objective"})
    objectives: tuple[str, ...] = field(default=("tl", "margin"), metadata={
        "help": "comma-separated search objectives: tl, margin, choice-prob, ppl"})
    k: int = field(default=6, metadata={"type": "positive_int", "help": "blocks to remove"})
    samples: int = field(default=16, metadata={
        "type": "positive_int", "help": "calibration documents per task (a fixed, seeded sample)"})
    max_length: int = field(default=256, metadata={
        "type": "positive_int", "help": "tokens kept per request (the last ones)"})
    barriers: tuple[int, int] = field(default=(1, 1), metadata={
        "type": "int_pair", "help": "blocks protected at the start and the end, e.g. 1,1"})
    max_batch_tokens: int = field(default=512, metadata={
        "flag": "--batch-tokens", "type": "positive_int", "help": "padded tokens per forward pass"})
    reuse_prefix: bool = field(default=True, metadata={
        "flag": "--no-prefix-reuse", "help": "recompute the dense prefix for every candidate (exact either way; "
                                             "slower, only to measure the reuse)"})
    run_dir: str = field(default="runs/candidates", metadata={
        "help": "checkpoints, one per search; reruns resume"})
    out: str = field(default="runs/pool", metadata={
        "required": True, "help": "folder the pool artifact (pool.json) is written to"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})
    granularity: str = field(default="block", metadata={
        "choices": ("block", "sublayer"),  # search.GRANULARITIES, literal for the CLI
        "help": "what the searches remove: 'block' (whole blocks, the paper's) or 'sublayer' (single attention or "
                "MLP sub-layers, up to k blocks' worth of parameters)"})

    def __post_init__(self):
        super().__post_init__()
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if self.granularity == "sublayer" and self.executor != "local":
            raise ConfigError("--granularity sublayer runs on the local executor only (its budget is counted in "
                              "the local model's parameters)")
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
            **quantize_identity(config.quantize, config.quantize_head, config.quantize_skip)}


def _run_search(config: PoolConfig, executor: Executor, fingerprint, task: str, objective_name: str,
                docs) -> SetSource:
    """One greedy search, its candidate sets evaluated by ``executor`` (the same results on every executor)."""
    objective = get_objective(objective_name)
    evaluator = executor.evaluator(objective.requests(docs), reuse_prefix=config.reuse_prefix)
    if config.granularity == "sublayer":
        return _run_sublayer_search(config, evaluator, fingerprint, task, objective_name, docs)
    checkpoint = Path(config.run_dir) / f"{task}-{objective_name}.json"
    result = greedy_search(evaluator, lambda scores: objective.loss(docs, scores), config.k,
                           barriers=config.barriers, checkpoint=checkpoint,
                           identity=_search_identity(config, fingerprint, task, objective_name, docs),
                           progress=f"{task}/{objective_name}" if config.progress else False)
    return SetSource("greedy", task, objective_name, result.removal_order, result.trajectory,
                     [d.doc_id for d in docs], round(result.seconds, 2))


def _run_sublayer_search(config: PoolConfig, evaluator, fingerprint, task: str, objective_name: str,
                         docs) -> SetSource:
    """The sub-layer search at a budget of ``config.k`` blocks (:func:`sublayer_search`); its checkpoint sits
    beside the block searches' under its own name, and its identity adds the budget and the sub-layer costs."""
    from pudding.pruning.finercut import sublayer_costs

    objective = get_objective(objective_name)
    costs = sublayer_costs(evaluator.model, config.barriers)
    identity = {**_search_identity(config, fingerprint, task, objective_name, docs), "granularity": "sublayer",
                "budget": config.k, "costs": costs}
    result = sublayer_search(evaluator, lambda scores: objective.loss(docs, scores), config.k, costs,
                             checkpoint=Path(config.run_dir) / f"{task}-{objective_name}-sublayer.json",
                             identity=identity, progress=f"{task}/{objective_name}/sublayer" if config.progress
                             else False)
    return SetSource("greedy", task, objective_name, result.removal_order, result.trajectory,
                     [d.doc_id for d in docs], round(result.seconds, 2))


def _prepare(config: PoolConfig) -> tuple[dict, dict[str, list[MCDoc]]]:
    """Validate everything that can fail before the slow part: model, k, and every task's sample count."""
    model_config = load_config(config.model)
    check_k(config.k, model_config.num_hidden_layers, config.barriers)
    data_tasks = {get_objective(o).text_task or t for t in config.tasks for o in config.objectives}
    docs = {t: calibration_docs(t, config.samples) for t in sorted(data_tasks)}
    return model_fingerprint(model_config), docs


def _replica(config: PoolConfig) -> ModelReplica:
    return ModelReplica(config.model, config.max_batch_tokens, config.max_length, config.quantize,
                        config.quantize_head, config.quantize_skip)


@locks_output("run_dir", "out")
def build_pool(config: PoolConfig) -> CandidatePool:
    """Run every (task, objective) search, deduplicate, and save the pool to ``config.out``."""
    fingerprint, docs = _prepare(config)
    executor = start_executor(config.executor, _replica(config), config.ray_settings)
    found = []
    for task in config.tasks:
        for objective in config.objectives:
            data = docs[get_objective(objective).text_task or task]
            source = _run_search(config, executor, fingerprint, task, objective, data)
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
    from pudding.pruning.baselines import ONE_SHOT_METHODS

    if config.executor != "local":
        raise ConfigError("the baselines run on the local executor only (the one-shot methods need gradients)")
    if config.granularity != "block":
        raise ConfigError("--granularity applies to `pudding candidates`; the sub-layer baseline is "
                          "`pudding baselines --methods finercut`")
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
    scorer = _replica(config).scorer()
    found, subblock = [], []
    for method in methods:
        if method in SUBBLOCK_METHODS:  # sets that name sub-layers go to their own file, not pool.json
            subblock.append(_run_finercut(config, scorer, fingerprint, docs))
            continue
        if method == "sleb":
            source = _run_search(config, LocalExecutor(scorer), fingerprint, "sleb", "ppl", docs)
            source = SetSource("sleb", None, "ppl", *[getattr(source, f) for f in
                                                      ("removal_order", "trajectory", "sample_ids", "seconds")])
        else:
            source = _run_one_shot(config, scorer, fingerprint, method, docs)
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


def _run_one_shot(config: PoolConfig, scorer, fingerprint: dict, method: str, docs: list[MCDoc]) -> SetSource:
    """One one-shot baseline's ranking, checkpointed in the run folder like a search: a rerun (a resumed job)
    reuses it on an exact identity match instead of paying for its forward and backward passes again."""
    from pudding.pruning.baselines import rank_blocks

    checkpoint = Path(config.run_dir) / f"{method}-ppl.json"
    identity = {**_search_identity(config, fingerprint, method, "ppl", docs), "k": config.k}
    if checkpoint.exists():
        saved = read_json(checkpoint, f"the checkpoint {checkpoint} vanished")
        require_identity(saved.get("identity"), identity, f"checkpoint {checkpoint} was written for another model "
                         "or configuration", "delete it or use another --run-dir")
        return SetSource(**saved["source"])
    ranking = rank_blocks(method, scorer, get_objective("ppl").requests(docs), config.k,
                          config.barriers)
    source = SetSource(method, None, None, list(ranking.blocks),
                       [ranking.importance[b] for b in sorted(ranking.importance)],
                       [d.doc_id for d in docs], round(ranking.seconds, 2))
    atomic_write_json(checkpoint, {"identity": identity, "source": asdict(source)})
    return source


def _run_finercut(config: PoolConfig, scorer, fingerprint: dict, docs: list[MCDoc]):
    """FinerCut at ``config.k`` blocks' budget on the same calibration text and barriers as the other baselines."""
    from pudding.pruning.finercut import run_finercut

    return run_finercut(scorer, get_objective("ppl").requests(docs), config.k, barriers=config.barriers,
                        checkpoint=Path(config.run_dir) / "finercut-js.json",
                        identity=_search_identity(config, fingerprint, "finercut", "js", docs),
                        sample_ids=[d.doc_id for d in docs], progress="finercut" if config.progress else False)
