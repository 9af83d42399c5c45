"""``pudding reproduce``: the paper's tables, measured by pudding on data no stage has seen.

One resumable command, in stages (each reports its wall time in ``stages.json``):

1. **artifacts**: the pool, the baselines, and every calibration prompt's label under every set, reused from
   ``--reuse DIR`` (or this run's own folder) only when their recorded identity matches exactly, else
   built. A smaller k than a found pool's is derived from it exactly (:func:`pudding.pool.artifact.shrink_pool`);
2. **scores**: every evaluation document of the paper's six tasks and of six unseen tasks under every set
   any row needs (dense, each baseline, each pool set). Calibration labels and evaluation scores are the
   same job (``pudding label``) on different splits, sharded and checkpointed per set;
3. **routers**: the paper's router and its ablations, and the routing variants (the paper's router and the task
   router x label target x pool x safe routing, and a pool size chosen on calibration data); the best variant
   by validation accuracy on calibration prompts is trained with several seeds. Nothing is chosen on
   evaluation documents;
4. **tables**: every row from the per-document scores, without running the LLM again; one JSON per table
   (with provenance), a Markdown rendering and the plots.

Budgets (``--budget``) fix the documents per task of every stage and are stated in every table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.identity import find_reusable, identity_differences
from pudding.core.load import load_model, model_fingerprint, model_name
from pudding.core.provenance import atomic_write_json, atomic_write_text, locks_output, provenance, read_json
from pudding.core.quantize import quantize_identity
from pudding.core.tasks import PAPER_TASKS
from pudding.evaluation.report import (
    plot_accuracy_vs_k,
    plot_convergence,
    plot_omission_rates,
    plot_paired_differences,
    render_report,
)
from pudding.evaluation.tables import (
    Routed,
    RowId,
    StaticChoices,
    ablation_tables,
    correct_at,
    seed_mean,
    split_table,
    static_choices,
    static_columns,
    switch_rates,
)
from pudding.pool.artifact import SHIPPED_ARTIFACTS, CandidatePool, PoolEntry, SetSource, shrink_pool
from pudding.pool.executor import ExecutorFields
from pudding.pruning.candidates import PoolConfig, build_baselines, build_pool
from pudding.pruning.importance import (
    IMPORTANCE_FILE,
    ImportanceConfig,
    block_importance,
    load_importance,
    plot_heatmap,
)
from pudding.routing.labels import LabelConfig, Labels, build_labels, collect_docs, labels_identity, run_identity
from pudding.routing.model import ROUTER_FILE, PuddingModel
from pudding.routing.train import (
    TARGETS,
    VAL_FRACTION,
    RoutingData,
    TrainConfig,
    frozen_features,
    routing_data,
    split_rows,
    train_router,
)

UNSEEN_TASKS = ("mmlu", "openbookqa", "sciq", "commonsense_qa", "social_iqa", "medmcqa")


@dataclass(frozen=True)
class Budget:
    """How many documents each stage of a reproduction uses, per task."""

    paper_docs: int  # evaluation documents per paper task (all of them where a task has fewer)
    unseen_docs: int  # evaluation documents per unseen task
    label_docs: int  # calibration prompts per task labelled for the routers
    search_docs: int  # calibration documents per task of the candidate searches and the baselines
    objectives: tuple[str, ...]  # the pool's search objectives


BUDGETS = {
    "tiny": Budget(8, 4, 12, 16, ("tl", "margin")),
    "small": Budget(30, 15, 64, 16, ("tl", "margin")),
    # The paper's calibration size (128 search documents per task); TL only: margin costs three times as much.
    # 400 evaluation documents per paper task: with the per-document spread of paired differences measured at
    # the small budget (sd about 0.5, scripts/power.py), a 95% interval of +/-0.02 and 80% power at 0.03.
    "medium": Budget(400, 100, 200, 128, ("tl",)),
    "full": Budget(500, 200, 256, 128, ("tl", "margin")),
}
ROUTER_ABLATIONS = (("embed-mlp", "mse"), ("embed-mlp", "ce"), ("llm-embed", "mse"), ("encoder", "mse"),
                    ("task", "mse"))
# The routers the variant grid crosses with label target x pool x safe routing: the paper's (the first of
# ``routers``) and the task router, which learns each task's best set rather than each prompt's noisy label.
VARIANT_ROUTER = ("task", "mse")
BASELINE_METHODS = ("sleb", "shortened_ppl", "taylor", "shortgpt")
POOL_VARIANTS = ("pool", "pool+baselines")  # the paper's pool; the same plus the static baselines' sets
EXTRA_POOL_VARIANT = "pool+baselines+extra"  # the same plus an --extra-pool's sets
POOL_SIZES = (1, 2, 3, 5, 8)  # sizes tried for the pool chosen on calibration data (plus the whole pool)


@dataclass(frozen=True)
class ReproduceConfig(ExecutorFields):
    """Settings of ``pudding reproduce``; each field's help text is its documentation.

    A given ``pool``'s identity is recorded instead of the search's. ``quantize`` (with ``quantize_head`` and
    ``quantize_skip``) quantize the LLM of every stage that runs it: the searches, the baselines (without
    ``taylor``, which needs weight gradients), the labels, the scores and the importance map; such a run gets
    folders of its own (``<budget>-int8``), and nothing fp32 is reused for it.
    """

    model: str = field(default="default", metadata={"help": "base model spec"})
    k: int = field(default=6, metadata={"type": "positive_int", "help": "blocks removed"})
    budget: str = field(default="small", metadata={
        "choices": ("tiny", "small", "medium", "full"),  # BUDGETS' keys (a test checks), literal for the CLI
        "help": "documents per task of every stage (see the README's budget table)"})
    out: str | None = field(default=None, metadata={"help": "default: results/<model>/<budget>/k<k>"})
    run_dir: str = field(default="runs/reproduce", metadata={"help": "checkpoints; reruns resume"})
    routers: tuple[tuple[str, str], ...] = field(default=ROUTER_ABLATIONS, metadata={
        "internal": "the router ablations of the paper's tables; not a user setting"})
    seed: int = field(default=0, metadata={"help": "the routers' training seed (the first of --router-seeds)"})
    router_seeds: int = field(default=5, metadata={
        "type": "positive_int", "help": "train the headline routers with this many seeds and report their spread "
                                        "and mean (how much is luck of the seed)"})
    variants: bool = field(default=True, metadata={
        "help": "skip the routing variants (router x label target x pool x safe routing, pool size)"})
    pool: str | None = field(default=None, metadata={
        "help": "use this candidate pool instead of the budget's search"})
    extra_pool: str | None = field(default=None, metadata={
        "type": "none_or_text",
        "help": "a pool of further candidate sets (e.g. `pudding candidates --objectives choice-prob`): the "
                "static choices may pick them and a routing variant routes over them too; the paper's rows keep "
                "the budget's pool. Scores shared with an earlier run in the same --run-dir are not recomputed"})
    reuse: str | None = field(default=None, metadata={
        "type": "none_or_text", "help": "folder of earlier results to reuse artifacts from, each only if its "
                                        "recorded identity matches exactly (the committed ones: results/smollm2); "
                                        "default: only this run's own folders"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        super().__post_init__()
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; known: {', '.join(BUDGETS)}")
        if self.router_seeds < 1:
            raise ConfigError(f"router_seeds must be at least 1, got {self.router_seeds}")
        if self.reuse is not None and not Path(self.reuse).is_dir():
            raise ConfigError(f"--reuse {self.reuse}: no such folder; name the folder of earlier results to reuse "
                              "(the committed ones: results/smollm2), or leave it out to reuse nothing")
        for flag, path in (("--pool", self.pool), ("--extra-pool", self.extra_pool)):
            if path is not None and not Path(path).exists():  # refused before the model loads
                raise ConfigError(f"{flag} {path}: no such folder or pool.json")
        object.__setattr__(self, "routers", tuple(tuple(r) for r in self.routers))

    @property
    def pool_variants(self) -> tuple[str, ...]:
        """The pools the routing variants route over, the widest last."""
        return POOL_VARIANTS + ((EXTRA_POOL_VARIANT,) if self.extra_pool else ())

    @property
    def sizes(self) -> Budget:
        return BUDGETS[self.budget]

    @property
    def default_router(self) -> str:
        return f"{self.routers[0][0]}-{self.routers[0][1]}"

    @property
    def router_specs(self) -> list[tuple[str, str, int, str]]:
        """(kind, loss, seed, name) of every ablation router: each kind and loss, then the first one's seeds."""
        specs = [(kind, loss, 0, f"{kind}-{loss}") for kind, loss in self.routers]
        kind, loss = self.routers[0]
        return specs + [(kind, loss, seed, f"{kind}-{loss}-seed{seed}") for seed in range(1, self.router_seeds)]

    @property
    def seed_routers(self) -> list[str]:
        return [name for kind, loss, seed, name in self.router_specs if (kind, loss) == self.routers[0]]

    @property
    def folder(self) -> Path:
        return Path(self.out) if self.out else Path("results") / _slug(self.model) / self.precision / f"k{self.k}"

    @property
    def work_dir(self) -> Path:
        """Checkpoints of this model, budget, precision and k: other runs never collide in one ``run_dir``."""
        return Path(self.run_dir) / _slug(self.model) / self.precision / f"k{self.k}"

    @property
    def precision(self) -> str:
        """The budget, suffixed by the quantization if there is one (``small``, ``small-int8``): a quantized
        run's folders, and its accuracy-against-k plot, stay apart from the fp32 ones."""
        if self.quantize == "none":
            return self.budget
        return (f"{self.budget}-{self.quantize}" + ("-head" if self.quantize_head else "")
                + ("-keep-" + "+".join(sorted(self.quantize_skip)) if self.quantize_skip else ""))

    @property
    def baseline_methods(self) -> tuple[str, ...]:
        """The static baselines this run computes: Taylor+ needs weight gradients, which int8 layers lack."""
        return BASELINE_METHODS if self.quantize == "none" else tuple(m for m in BASELINE_METHODS if m != "taylor")

    @property
    def reuse_root(self) -> Path | None:
        return Path(self.reuse) if self.reuse else None


def _slug(spec: str) -> str:
    return "smollm2" if spec == "default" else model_name(spec).replace("/", "--")


# --- what decided each artifact, and where earlier ones are found ------------------------------------------


def _found(root: Path | None, file: str) -> list[Path]:
    """Folders under ``root`` holding ``file``, nearest first (the reuse candidates)."""
    if root is None or not root.exists():
        return []
    return sorted((p.parent for p in root.rglob(file)), key=lambda p: (len(p.parts), str(p)))


def pool_identity(pool: CandidatePool) -> dict[str, Any]:
    """What decided a pool's (or the baselines') sets, except k: a pool searched at a larger k gives every
    smaller one exactly."""
    keys = ("tasks", "objectives", "samples", "max_length", "barriers", "methods")
    # A quantized search adds its method; an fp32 one adds nothing, so pools made before quantization match.
    quantized = quantize_identity(pool.config.get("quantize", "none"), pool.config.get("quantize_head", False),
                                  pool.config.get("quantize_skip", ()))
    return {"model": pool.model.get("fingerprint"), **{key: _listed(pool.config.get(key)) for key in keys},
            **quantized}


def _listed(value):
    return list(value) if isinstance(value, tuple | list) else value


def _wanted_pool(config: PoolConfig, fingerprint: dict, methods: tuple[str, ...] | None = None) -> dict[str, Any]:
    stand_in = CandidatePool((), {"fingerprint": fingerprint},
                             {**asdict(config), **({"methods": list(methods)} if methods else {})})
    return pool_identity(stand_in)


def _pool_differences(wanted: dict, k: int) -> Callable[[Path], list[str]]:
    def differences(folder: Path) -> list[str]:
        pool = CandidatePool.from_pretrained(folder)
        found_k = pool.config.get("k")
        return identity_differences(pool_identity(pool), wanted) + ([] if isinstance(found_k, int) and found_k >= k
                                                                    else ["k"])
    return differences


def _labels_differences(wanted: dict, needed: CandidatePool) -> Callable[[Path], list[str]]:
    def differences(folder: Path) -> list[str]:
        labels = Labels.load(folder)  # the table too: a truncated one is not reusable (skipped elsewhere)
        labelled = {tuple(s) for s in labels.meta["sets"]}
        missing = [] if all(e.blocks in labelled for e in needed.sets) else ["sets"]
        return identity_differences(labels.identity, wanted) + missing
    return differences


def router_identity(folder: Path) -> dict[str, Any]:
    """What decided a trained router: its pool, its training settings (not where files went) and its labels."""
    record = read_json(folder / "training.json", f"no training record in {folder}")
    settings = {k: v for k, v in record["config"].items() if k not in ("labels", "pool", "out", "progress")}
    settings.setdefault("target", "tl")
    settings.setdefault("safe", False)
    return {"pool": record.get("pool"), "train": settings, "labels": record.get("labels_identity")}


def importance_identity(config: dict[str, Any], fingerprint: dict) -> dict[str, Any]:
    """What decided a block-importance map: the model, the tasks, the documents per task and their length,
    and the quantization (absent in maps made before quantization existed: fp32)."""
    return {"model": fingerprint, "tasks": _listed(config.get("tasks")), "samples": config.get("samples"),
            "max_length": config.get("max_length"),
            **quantize_identity(config.get("quantize", "none"), config.get("quantize_head", False),
                                config.get("quantize_skip", ()))}


# --- stage 1: the artifacts the rows need --------------------------------------------------------------------


def _search_config(config: ReproduceConfig, name: str) -> PoolConfig:
    objectives = ("ppl",) if name == "baselines" else config.sizes.objectives
    # The baselines' one-shot methods need gradients, so they run locally; the searches may use Ray.
    execution = {} if name == "baselines" else config.execution
    return PoolConfig(model=config.model, k=config.k, samples=config.sizes.search_docs, objectives=objectives,
                      run_dir=str(config.work_dir / name), out=str(config.folder / name), progress=config.progress,
                      **config.quantization, **execution)


def _pool(config: ReproduceConfig, name: str, fingerprint: dict, log: dict) -> CandidatePool:
    """The pool (``name="pool"``), the baselines or the ``--extra-pool`` (``name="extra"``): a given pool, else
    one found with this budget's identity, else searched now; shrunk to this k if it has a larger one."""
    given = {"pool": config.pool, "extra": config.extra_pool}.get(name)
    if given:
        pool = CandidatePool.from_pretrained(given)
        log[name] = {"given": given}
    else:
        search = _search_config(config, name)
        methods = config.baseline_methods if name == "baselines" else None
        wanted = _wanted_pool(search, fingerprint, methods)
        found = find_reusable(config.folder / name, _found(config.reuse_root, "pool.json"),
                              _pool_differences(wanted, config.k), name)
        if found is None:
            log[name] = {"built": str(config.folder / name)}
            return build_baselines(search, methods) if name == "baselines" else build_pool(search)
        pool = CandidatePool.from_pretrained(found)
        log[name] = {"reused": str(found)}
    if pool.config.get("k") != config.k:
        pool = shrink_pool(pool, config.k)
        log[name]["shrunk_to"] = config.k
    if log[name].get("reused") != str(config.folder / name):
        # Every run's folder holds the pool and baselines its tables used (a reused one keeps its own
        # provenance), so each k and budget has the same self-contained layout.
        pool.save_pretrained(config.folder / name)
    return pool


@dataclass(frozen=True)
class ScoringColumns:
    """Where each set a row needs is in the scoring pool (its column in every score table)."""

    fixed: dict[str, int]  # "dense" and each baseline method
    pool: list[int]  # each pool set, in the pool's order
    extra: list[int] = field(default_factory=list)  # each --extra-pool set, in its pool's order

    @property
    def without_extra(self) -> list[int]:
        """The distinct sets of the pool+baselines variant: the pool's, then the baselines'."""
        return list(dict.fromkeys(self.pool + [c for name, c in self.fixed.items() if name != "dense"]))

    @property
    def candidates(self) -> list[int]:
        """The distinct sets a static choice or a bound may pick: the pool's, the baselines', the extra ones."""
        return list(dict.fromkeys(self.without_extra + self.extra))


def _scoring_pool(pool: CandidatePool, baselines: CandidatePool,
                  extra: CandidatePool | None = None) -> tuple[CandidatePool, ScoringColumns]:
    """One pool with every distinct set any row needs, and where each row's set is in it. The extra sets come
    last, so the columns of a run without them are unchanged."""
    entries: list[PoolEntry] = []
    index: dict[tuple, int] = {}

    def add(blocks: tuple, source: SetSource) -> int:
        if blocks not in index:
            index[blocks] = len(entries)
            entries.append(PoolEntry(blocks, (source,)))
        return index[blocks]

    fixed = {"dense": add((), SetSource("dense", None, None, [], [], [], 0.0))}
    for entry in baselines.sets:  # at a small k two baselines can find the same set: one row each
        for source in entry.sources:
            fixed[source.method] = add(entry.blocks, source)
    columns = ScoringColumns(fixed, [add(entry.blocks, entry.sources[0]) for entry in pool.sets],
                             [add(entry.blocks, entry.sources[0]) for entry in (extra.sets if extra else ())])
    # The saved config keeps the form earlier runs wrote (row name -> column), so their scoring pools match.
    rows = {**fixed, **{f"pool:{i}": c for i, c in enumerate(columns.pool)},
            **{f"extra:{i}": c for i, c in enumerate(columns.extra)}}
    return CandidatePool(tuple(entries), pool.model, {"rows": rows}, provenance()), columns


def _scores(config: ReproduceConfig, scoring_pool: CandidatePool, split: str, tasks: tuple[str, ...], samples: int,
            name: str, model, tokenizer, log: dict) -> Path:
    """Every document of ``tasks`` (``samples`` each, from ``split``) under every set of the scoring pool:
    the routers' labels on the calibration split, the tables' scores on the evaluation split."""
    pool_dir = config.work_dir / "scoring-pool"
    scoring_pool.save_pretrained(pool_dir)
    label_config = LabelConfig(pool=str(pool_dir), out=str(config.folder / name), tasks=tasks, samples=samples,
                               split=split, run_dir=str(config.work_dir / name.replace("/", "-")),
                               progress=config.progress, **config.quantization, **config.execution)
    wanted = {k: v for k, v in run_identity(label_config, scoring_pool.model["fingerprint"],
                                            collect_docs(label_config)).items() if k != "shard_size"}
    found = find_reusable(config.folder / name, _found(config.reuse_root, "labels.json"),
                          _labels_differences(wanted, scoring_pool), name)
    if found is not None:
        log[name] = {"reused": str(found)}
        return found
    log[name] = {"built": str(config.folder / name)}
    return build_labels(label_config, model=model, tokenizer=tokenizer)


def _sub_pool(scoring_pool: CandidatePool, columns: list[int], name: str, folder: Path) -> tuple[CandidatePool, Path]:
    """The scoring pool's sets at ``columns`` as a pool of its own, saved for training a router on it."""
    pool = CandidatePool(tuple(scoring_pool.sets[c] for c in columns), scoring_pool.model, {"variant": name,
                                                                                           "columns": columns})
    path = folder / "pools" / name.replace("+", "-plus-")
    pool.save_pretrained(path)
    return pool, path


# --- stage 3: routers -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterSpec:
    """One router to train: its name in the tables, its pool (scoring-pool columns) and its settings."""

    name: str
    pool: str  # a key of the run's pools
    kind: str = "embed-mlp"
    loss: str = "mse"
    target: str = "tl"
    safe: bool = False
    seed: int = 0


def _router(config: ReproduceConfig, spec: RouterSpec, pools: dict[str, tuple[CandidatePool, Path]], labels_dir: Path,
            model, tokenizer, log: dict) -> tuple[PuddingModel, Path]:
    """A trained router for ``spec``: one found with the same identity (the shipped artifact included), else
    trained now into this run's folder."""
    pool, pool_dir = pools[spec.pool]
    train_config = TrainConfig(labels=str(labels_dir), pool=str(pool_dir),
                               out=str(config.folder / "routers" / spec.name),
                               router=spec.kind, loss=spec.loss, seed=spec.seed, target=spec.target, safe=spec.safe,
                               progress=config.progress)
    wanted = {"pool": pool.fingerprint(), "train": {k: v for k, v in asdict(train_config).items()
                                                    if k not in ("labels", "pool", "out", "progress")},
              "labels": labels_identity(Labels.read_meta(labels_dir))}
    shipped = list(SHIPPED_ARTIFACTS.values()) if config.model == "default" else []
    # Large routers' weights are not committed (.gitignore), so a folder may hold a router's record without
    # it: such a folder is not reused, and in this run's own folder the router is trained again.
    elsewhere = shipped + [p for p in _found(config.reuse_root, "training.json")
                           if (p / "pudding.json").exists() and (p / ROUTER_FILE).exists()]
    found = find_reusable(config.folder / "routers" / spec.name, elsewhere,
                          lambda folder: identity_differences(router_identity(folder), wanted), f"router {spec.name}")
    if found is not None and (found / ROUTER_FILE).exists():
        log[f"router {spec.name}"] = {"reused": str(found)}
        return PuddingModel.from_pretrained(found, model=model, tokenizer=tokenizer, **config.quantization), found
    log[f"router {spec.name}"] = {"built": train_config.out}
    return train_router(train_config, model=model, tokenizer=tokenizer), Path(train_config.out)


def _validation_accuracy(folder: Path) -> float:
    """A router's accuracy on its validation prompts (calibration data), as its selection score. For safe
    routing, the cross-fitted accuracy: a threshold tuned on the same prompts would flatter it."""
    record = read_json(folder / "training.json", f"no training record in {folder}")
    return record["safe"]["acc_safe_crossfit"] if "safe" in record else record["val"]["acc_routed"]


# --- stage timings --------------------------------------------------------------------------------------------


class Stages:
    """Wall time of each stage of this invocation, printed as it ends and kept for ``stages.json``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[reproduce] {name}: {self.seconds[name]:.1f} s", file=sys.stderr, flush=True)




def _variant_specs(config: ReproduceConfig) -> list[RouterSpec]:
    """The routing variants: router x label target x pool x safe routing (seed 0), the router being the paper's
    kind and loss, then the task router. The paper's own configuration (its router, tl, its pool, argmax) is
    the first and keeps its name."""
    if not config.variants:
        return []
    specs = []
    for kind, loss in dict.fromkeys([config.routers[0], VARIANT_ROUTER]):
        for target in TARGETS:
            for pool in config.pool_variants:
                for safe in (False, True):
                    name = f"{kind}-{loss}" + ("" if (target, pool) == ("tl", "pool")
                                               else f"-{target}-{pool.replace('+', '-plus-')}")
                    specs.append(RouterSpec(name + ("-safe" if safe else ""), pool, kind, loss, target, safe))
    return specs


def _train_routers(config: ReproduceConfig, pools: dict, labels_dir: Path, calibration: RoutingData, scoring_pool,
                   model, tokenizer, log: dict) -> tuple[dict[str, tuple[PuddingModel, Path]], dict[str, Any]]:
    """Every router of the run, by name, and how the best variant was chosen (on calibration prompts only)."""
    trained: dict[str, tuple[PuddingModel, Path]] = {}

    def train(spec: RouterSpec):
        if spec.name not in trained:
            trained[spec.name] = _router(config, spec, pools, labels_dir, model, tokenizer, log)
        return trained[spec.name]

    for kind, loss, seed, name in config.router_specs:
        train(RouterSpec(name, "pool", kind, loss, seed=seed))
    grid = _variant_specs(config)
    for spec in grid:
        train(spec)
    selection: dict[str, Any] = {"validation_accuracy": {}}
    if not grid:
        return trained, selection
    scores = {spec.name: _validation_accuracy(trained[spec.name][1]) for spec in grid}
    # The pool size, chosen on calibration data: the n best sets of the widest pool by training-prompt accuracy,
    # routed with the best target and safety found on that pool.
    widest = config.pool_variants[-1]
    wide = max((spec for spec in grid if spec.pool == widest), key=lambda spec: _score_key(scores[spec.name]))
    train_rows, _ = split_rows(calibration.texts, VAL_FRACTION)
    wide_columns = pools[widest][0].config["columns"]
    ranked = sorted(wide_columns, key=lambda c: -calibration.correct[train_rows, c].mean().item())
    sized = []
    for n in [n for n in POOL_SIZES if n < len(ranked)]:
        name = f"top{n}"
        pools[name] = _sub_pool(scoring_pool, ranked[:n], name, config.work_dir)
        spec = replace(wide, name=f"{wide.name}-top{n}", pool=name)
        train(spec)
        scores[spec.name] = _validation_accuracy(trained[spec.name][1])
        sized.append(spec)
    best_size = max([wide, *sized], key=lambda spec: _score_key(scores[spec.name]))
    candidates = [*grid, best_size]
    best = max(candidates, key=lambda spec: _score_key(scores[spec.name]))  # first wins ties: the simpler one
    for seed in range(1, config.router_seeds):
        train(replace(best, name=f"{best.name}-seed{seed}", seed=seed))
    selection.update(validation_accuracy=scores, pool_size_chosen=best_size.name, best=best.name,
                     best_spec=asdict(best), sized=[spec.name for spec in sized], grid=[spec.name for spec in grid])
    return trained, selection


def _score_key(value: float) -> float:
    return float("-inf") if value != value else value  # NaN (too few prompts to cross-fit) never wins


def _routed(trained: dict[str, tuple[PuddingModel, Path]], pools: dict, texts: list[str]) -> dict[str, Routed]:
    """Each router's scores on ``texts`` (each prompt read once per router), with its sets' columns."""
    out = {}
    for name, (pudding, _) in trained.items():
        columns = [_column_of(pools["scoring"][0], entry.blocks) for entry in pudding.pool.sets]
        # The routers on one frozen encoder (dozens in the variant grid) share its features: encoded once.
        features = frozen_features(pudding.router, texts)
        out[name] = Routed(pudding, pudding.router.scores(texts, features=features), columns)
    return out


def _column_of(scoring_pool: CandidatePool, blocks: tuple) -> int:
    return next(i for i, entry in enumerate(scoring_pool.sets) if entry.blocks == blocks)


@locks_output("folder", "work_dir")
def reproduce(config: ReproduceConfig) -> dict[str, Any]:
    """Run every stage and write the tables; returns the summary."""
    stages, log = Stages(), {}
    sizes = config.sizes
    with stages("load model"):
        model, tokenizer = load_model(config.model, **config.quantization)
    fingerprint = model_fingerprint(model.config)
    with stages("pool and baselines"):
        pool = _pool(config, "pool", fingerprint, log)
        pool.check_model(model.config)
        baselines = _pool(config, "baselines", fingerprint, log)
        extra = _pool(config, "extra", fingerprint, log) if config.extra_pool else None
        if extra:
            extra.check_model(model.config)
    scoring_pool, columns = _scoring_pool(pool, baselines, extra)
    with stages("calibration labels"):
        labels_dir = _scores(config, scoring_pool, "calibration", PAPER_TASKS, sizes.label_docs, "labels", model,
                             tokenizer, log)
    with stages("evaluation scores"):
        main_dir = _scores(config, scoring_pool, "evaluation", PAPER_TASKS, sizes.paper_docs, "scores/paper-tasks",
                           model, tokenizer, log)
        unseen_dir = _scores(config, scoring_pool, "evaluation", UNSEEN_TASKS, sizes.unseen_docs,
                             "scores/unseen-tasks", model, tokenizer, log)
    pools = {"scoring": (scoring_pool, config.work_dir / "scoring-pool"),
             "pool": _sub_pool(scoring_pool, columns.pool, "pool", config.work_dir),
             "pool+baselines": _sub_pool(scoring_pool, columns.without_extra, "pool+baselines", config.work_dir)}
    if extra:
        pools[EXTRA_POOL_VARIANT] = _sub_pool(scoring_pool, columns.candidates, EXTRA_POOL_VARIANT, config.work_dir)
    # The paper-pool labels are saved next to the union ones, so the paper's routers train on exactly the
    # columns they route over (Labels.for_pool restricts; nothing is scored again).
    calibration = routing_data(Labels.load(labels_dir).for_pool(scoring_pool))
    with stages("routers"):
        trained, selection = _train_routers(config, pools, labels_dir, calibration, scoring_pool, model, tokenizer,
                                            log)
    with stages("tables and plots"):
        scores = {"main": Labels.load(main_dir).for_pool(scoring_pool),
                  "generalisation": Labels.load(unseen_dir).for_pool(scoring_pool)}
        summary = _write_tables(config, pool, pools, columns, calibration, trained, selection, scores, model, log)
    stamp = {"config": asdict(config), "budget": asdict(sizes), "seconds": stages.seconds, "artifacts": log,
             "provenance": provenance()}
    atomic_write_json(config.folder / "stages.json", stamp)
    return summary


# --- stage 4: the tables, from the per-document scores -------------------------------------------------------


def _headline_rows(config: ReproduceConfig, selection: dict[str, Any]) -> dict[RowId, list[str]]:
    """The PuDDing rows of the main and unseen-task tables, each with the routers it averages per document:
    the paper's router, the best variant (chosen on calibration data), and each one's mean over the seeds."""
    rows = {}
    for name, role in ((config.default_router, "paper"), (selection.get("best"), "best variant")):
        if name:
            seeds = [name] + [f"{name}-seed{seed}" for seed in range(1, config.router_seeds)]
            rows[RowId("pudding", router=name, role=role)] = [name]
            if len(seeds) > 1:
                rows[RowId("pudding", router=name, role=role, seeds=len(seeds))] = seeds
    return rows


def _write_tables(config: ReproduceConfig, pool: CandidatePool, pools: dict, columns: ScoringColumns,
                  calibration: RoutingData, trained: dict, selection: dict, scores: dict[str, Labels], model,
                  log: dict) -> dict[str, Any]:
    """Every table from the per-document scores (one JSON each, with provenance), then the plots and the
    README. The static choices see calibration prompts only; the bounds are marked as hindsight."""
    sizes, out = config.sizes, config.folder
    train_rows, _ = split_rows(calibration.texts, VAL_FRACTION)
    static = static_choices(calibration, train_rows, columns.pool, columns.candidates)
    headline = _headline_rows(config, selection)
    stamp = {"config": asdict(config), "budget": {"paper_tasks": sizes.paper_docs, "unseen_tasks": sizes.unseen_docs,
                                                  "calibration_labels": sizes.label_docs,
                                                  "search": sizes.search_docs},
             "pool": pool.fingerprint(), "artifacts": log, "provenance": provenance()}
    tables, data, routed = {}, {}, {}
    for name, tasks in (("main", PAPER_TASKS), ("generalisation", UNSEEN_TASKS)):
        data[name] = routing_data(scores[name])
        # Every router reads the main table's prompts (the ablations use them all); the unseen tasks need
        # only the rows' own routers.
        needed = (trained if name == "main"
                  else {n: trained[n] for n in dict.fromkeys(n for names in headline.values() for n in names)})
        routed[name] = _routed(needed, pools, data[name].texts)
        tables[name] = _split_table(config, data[name], routed[name], tasks, static, columns, headline, pool,
                                    switch=name == "main" and bool(selection.get("best")))
        atomic_write_json(out / f"{name}.json", {**stamp, **tables[name]})
    ranking = calibration.labels[train_rows][:, columns.pool].mean(0).argsort(descending=True).tolist()
    ablations = ablation_tables(data["main"], routed["main"], pool, ranking,
                                [name for _, _, seed, name in config.router_specs if seed == 0],
                                config.default_router, config.seed_routers, selection, PAPER_TASKS)
    for name, table in ablations.items():
        atomic_write_json(out / f"ablation-{name}.json", {**stamp, **table})
    plot_paired_differences(tables["main"], out / "paired-differences.png")
    figures = ["![paired differences](paired-differences.png)", "",
               *_write_figures(config, data["main"], routed["main"], pools, trained, selection, pool, model, stamp)]
    atomic_write_text(out / "README.md", render_report(_title(config), tables, ablations, figures,
                                                       stamp["provenance"]))
    return {"tables": tables, "ablations": ablations, "selection": selection, "out": str(out)}


def _split_table(config: ReproduceConfig, data: RoutingData, routed: dict[str, Routed], tasks: tuple[str, ...],
                 static: StaticChoices, columns: ScoringColumns, headline: dict[RowId, list[str]],
                 pool: CandidatePool, switch: bool) -> dict[str, Any]:
    """One split's table: the static rows and bounds, then each PuDDing row from its routers' choices."""
    rows = static_columns(data, columns.fixed, static, columns.pool, columns.candidates, config.seed)
    for row, routers in headline.items():
        rows[row] = (correct_at(data, routed[routers[0]].chosen()) if len(routers) == 1
                     else seed_mean(data, [routed[name] for name in routers]))
    table = split_table(data, rows, tasks, list(headline), pool, columns.pool)
    if switch:
        table["switch_rate"] = switch_rates(routed, data)
    return table


def _title(config: ReproduceConfig) -> str:
    sizes = config.sizes
    precision = "" if config.quantize == "none" else (f", {config.quantize} model in every stage"
                                                      + (" (LM head too)" if config.quantize_head else "")
                                                      + (f" ({', '.join(config.quantize_skip)} fp32)"
                                                         if config.quantize_skip else ""))
    return (f"# PuDDing reproduction on {_slug(config.model)}, k={config.k}{precision} (budget {config.budget}: "
            f"{sizes.paper_docs} documents per paper task, {sizes.unseen_docs} per unseen task; "
            f"{sizes.label_docs} calibration prompts per task for the routers, "
            f"{sizes.search_docs} for the searches)"
            # The run folder's own copy, not the path as given: that may be absolute and machine-specific.
            + ("; with the extra candidate sets in extra/" if config.extra_pool else ""))


def _write_figures(config: ReproduceConfig, data: RoutingData, routed: dict[str, Routed], pools: dict,
                   trained: dict, selection: dict, pool: CandidatePool, model, stamp: dict) -> list[str]:
    """The plots of the main table's run (and the omission rates' JSON); returns their Markdown lines."""
    out, best = config.folder, selection.get("best")
    chosen = routed[best or config.default_router].chosen()
    blocks_of = {c: pools["scoring"][0].sets[c].blocks for c in set(chosen)}
    rates = plot_omission_rates(data, [blocks_of[c] for c in chosen], model.config.num_hidden_layers,
                                out / "omission-rates.png")
    atomic_write_json(out / "omission-rates.json", {**stamp, "router": best or config.default_router, "rates": rates})
    plotted = [name for _, _, seed, name in config.router_specs if seed == 0] + ([best] if best else [])
    plot_convergence({name: trained[name][1] for name in plotted}, out / "router-convergence.png")
    tl_sets = {s.task: entry.blocks for entry in pool.sets for s in entry.sources if s.objective == "tl"}
    plot_heatmap(_importance_map(config, model), out / "block-importance.png", marks=tl_sets,
                 marks_label=f"the task's TL set at k={config.k}")
    figures = ["![omission rates](omission-rates.png)", "", "![router convergence](router-convergence.png)", "",
               "![block importance](block-importance.png)", ""]
    if plot_accuracy_vs_k(out.parent, config.budget):
        figures += ["Accuracy against k, over every k reproduced with this budget: "
                    f"[../accuracy-vs-k-{config.budget}.png](../accuracy-vs-k-{config.budget}.png)", ""]
    return figures


def _importance_map(config: ReproduceConfig, model) -> dict[str, Any]:
    """The block-importance map (it does not depend on k): one made for exactly this model, documents and
    quantization, next to the k folders or under ``--reuse``; else measured once next to the k folders."""
    measure = ImportanceConfig(model=config.model, samples=16, out=str(config.folder.parent / "importance"),
                               progress=config.progress, **config.quantization)
    wanted = importance_identity(asdict(measure), model_fingerprint(model.config))

    def differences(folder: Path) -> list[str]:
        found = load_importance(folder)
        return identity_differences(importance_identity(found.get("config", {}), found["model"]["fingerprint"]),
                                    wanted)

    root = config.reuse_root
    found = find_reusable(Path(measure.out), _found(root / "importance" if root else None, IMPORTANCE_FILE),
                          differences, "block-importance map")
    return load_importance(found) if found else block_importance(measure)
