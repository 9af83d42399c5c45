"""``pudding reproduce``: the paper's tables, measured by pudding on data no stage has seen.

One resumable command, in stages (each reports its wall time in ``stages.json``):

1. **artifacts**: the pool, the baselines, and every calibration prompt's label under every set, reused from
   ``--reuse DIR`` (or this run's own folder) only when their recorded identity matches exactly, else
   built. A smaller k than a found pool's is derived from it exactly (:func:`pudding.pool.artifact.shrink_pool`);
2. **scores**: every evaluation document of the paper's six tasks and of six unseen tasks under every set
   any row needs (dense, each baseline, each pool set). Calibration labels and evaluation scores are the
   same job (``pudding label``) on different splits, sharded and checkpointed per set;
3. **routers**: the paper's router and its ablations, and the routing variants (label target x pool x safe
   routing, and a pool size chosen on calibration data); the best variant by validation accuracy on
   calibration prompts is trained with several seeds. Nothing is chosen on evaluation documents;
4. **tables**: every row from the per-document scores, without running the LLM again; one JSON per table
   (with provenance), a Markdown rendering and the plots.

Budgets (``--budget``) fix the documents per task of every stage and are stated in every table.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pudding.core.errors import ConfigError
from pudding.core.load import load_model, model_fingerprint, model_name
from pudding.core.metrics import mean_with_stderr
from pudding.core.provenance import (
    atomic_write_figure,
    atomic_write_json,
    atomic_write_text,
    differing_keys,
    locks_output,
    provenance,
    read_json,
)
from pudding.core.quantize import check_quantization, quantize_identity
from pudding.core.tasks import PAPER_TASKS, get_task
from pudding.pool.artifact import DEFAULT_ARTIFACT, CandidatePool, PoolEntry, SetSource, shrink_pool
from pudding.pruning.candidates import PoolConfig, build_baselines, build_pool
from pudding.pruning.importance import (
    IMPORTANCE_FILE,
    ImportanceConfig,
    block_importance,
    load_importance,
    plot_heatmap,
)
from pudding.routing.labels import LabelConfig, Labels, build_labels, collect_docs, run_identity
from pudding.routing.model import PuddingModel
from pudding.routing.train import (
    TARGETS,
    VAL_FRACTION,
    RoutingData,
    TrainConfig,
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
COMMITTED = {"default": Path("results/smollm2")}  # where --reuse looks by default, per model
ROUTER_ABLATIONS = (("embed-mlp", "mse"), ("embed-mlp", "ce"), ("llm-embed", "mse"), ("encoder", "mse"))
BASELINE_METHODS = ("sleb", "shortened_ppl", "taylor", "shortgpt")
POOL_VARIANTS = ("pool", "pool+baselines")  # the paper's pool; the same plus the static baselines' sets
POOL_SIZES = (1, 2, 3, 5, 8)  # sizes tried for the pool chosen on calibration data (plus the whole pool)


@dataclass(frozen=True)
class ReproduceConfig:
    """Settings of ``pudding reproduce``.

    ``pool`` replaces the budget's search by a given pool folder (its identity is recorded instead);
    ``reuse`` is where earlier artifacts are looked for (``auto``: the committed results of the embedded
    model; ``None``: nowhere). An artifact there is reused only if its recorded identity matches.
    ``quantize`` (and ``quantize_head``) quantize the LLM of every stage that runs it: the searches, the
    baselines (without ``taylor``, which needs weight gradients), the labels, the scores and the importance
    map; such a run gets folders of its own (``<budget>-int8``), and nothing fp32 is reused for it.
    """

    model: str = "default"
    k: int = 6
    budget: str = "small"
    out: str | None = None  # default: results/<model>/<budget>/k<k>
    run_dir: str = "runs/reproduce"
    routers: tuple[tuple[str, str], ...] = ROUTER_ABLATIONS
    seed: int = 0
    router_seeds: int = 5  # the headline routers are also trained with seeds 1..n-1: how much is luck of the seed
    variants: bool = True  # the routing variants of label target, pool and safe routing
    pool: str | None = None
    reuse: str | None = "auto"
    progress: bool = True
    quantize: str = "none"
    quantize_head: bool = False

    def __post_init__(self):
        check_quantization(self.quantize, self.quantize_head)
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; known: {', '.join(BUDGETS)}")
        if self.router_seeds < 1:
            raise ConfigError(f"router_seeds must be at least 1, got {self.router_seeds}")
        object.__setattr__(self, "routers", tuple(tuple(r) for r in self.routers))

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
        return f"{self.budget}-{self.quantize}" + ("-head" if self.quantize_head else "")

    @property
    def baseline_methods(self) -> tuple[str, ...]:
        """The static baselines this run computes: Taylor+ needs weight gradients, which int8 layers lack."""
        return BASELINE_METHODS if self.quantize == "none" else tuple(m for m in BASELINE_METHODS if m != "taylor")

    @property
    def reuse_root(self) -> Path | None:
        if self.reuse == "auto":
            return COMMITTED.get(self.model)
        return Path(self.reuse) if self.reuse else None


def _slug(spec: str) -> str:
    return "smollm2" if spec == "default" else model_name(spec).replace("/", "--")


# --- one reuse rule -------------------------------------------------------------------------------------------


def find_reusable(own: Path, elsewhere: Iterable[Path], differences: Callable[[Path], list[str]], what: str
                  ) -> Path | None:
    """The one reuse rule of a reproduction: an artifact is reused only when nothing that decided its content
    differs from what this run needs (``differences(path)`` lists what does).

    In this run's own folder a mismatch is refused, naming the differing fields, because rebuilding would
    overwrite it; anywhere else it is skipped, and the artifact is rebuilt into the own folder.
    """
    if own.exists():
        differing = differences(own)
        if not differing:
            return own
        raise ConfigError(f"{own} holds a {what} made for another configuration (differs in: "
                          f"{', '.join(differing)}); delete it or choose another --out")
    for path in elsewhere:
        if path.resolve() != own.resolve():
            try:
                if not differences(path):
                    return path
            except ConfigError:  # unreadable or foreign: not reusable, and not ours to refuse
                continue
    return None


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
    quantized = quantize_identity(pool.config.get("quantize", "none"), pool.config.get("quantize_head", False))
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
        return differing_keys(pool_identity(pool), wanted) + ([] if isinstance(found_k, int) and found_k >= k
                                                              else ["k"])
    return differences


def _labels_differences(wanted: dict, needed: CandidatePool) -> Callable[[Path], list[str]]:
    def differences(folder: Path) -> list[str]:
        labels = Labels.load(folder)
        if labels.identity is None:
            return ["identity (written before label artifacts recorded one)"]
        differing = differing_keys(labels.identity, wanted)
        labelled = {tuple(s) for s in labels.meta["sets"]}
        return differing + ([] if all(e.blocks in labelled for e in needed.sets) else ["sets"])
    return differences


def router_identity(folder: Path) -> dict[str, Any]:
    """What decided a trained router: its pool, its training settings (not where files went) and its labels."""
    record = read_json(folder / "training.json", f"no training record in {folder}")
    settings = {k: v for k, v in record["config"].items() if k not in ("labels", "pool", "out", "progress")}
    settings.setdefault("target", "tl")
    settings.setdefault("safe", False)
    return {"pool": record.get("pool"), "train": settings, "labels": record.get("labels_identity")}


# --- stage 1: the artifacts the rows need --------------------------------------------------------------------


def _search_config(config: ReproduceConfig, name: str) -> PoolConfig:
    objectives = ("ppl",) if name == "baselines" else config.sizes.objectives
    return PoolConfig(model=config.model, k=config.k, samples=config.sizes.search_docs, objectives=objectives,
                      run_dir=str(config.work_dir / name), out=str(config.folder / name), progress=config.progress,
                      quantize=config.quantize, quantize_head=config.quantize_head)


def _pool(config: ReproduceConfig, name: str, fingerprint: dict, log: dict) -> CandidatePool:
    """The pool (``name="pool"``) or the baselines: a given ``--pool``, else one found with this budget's
    identity (shrunk to this k if it was searched at a larger one), else searched now."""
    if name == "pool" and config.pool:
        pool = CandidatePool.from_pretrained(config.pool)
        log[name] = {"given": config.pool}
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
        pool.save_pretrained(config.folder / name)
        log[name]["shrunk_to"] = config.k
    return pool


def _scoring_pool(pool: CandidatePool, baselines: CandidatePool) -> tuple[CandidatePool, dict[str, int]]:
    """One pool with every distinct set any row needs, and each row name's index in it."""
    entries: list[PoolEntry] = []
    index: dict[tuple, int] = {}
    rows: dict[str, int] = {}

    def add(name: str, blocks: tuple, source: SetSource):
        if blocks not in index:
            index[blocks] = len(entries)
            entries.append(PoolEntry(blocks, (source,)))
        rows[name] = index[blocks]

    add("dense", (), SetSource("dense", None, None, [], [], [], 0.0))
    for entry in baselines.sets:  # at a small k two baselines can find the same set: one row each
        for source in entry.sources:
            add(source.method, entry.blocks, source)
    for i, entry in enumerate(pool.sets):
        add(f"pool:{i}", entry.blocks, entry.sources[0])
    return CandidatePool(tuple(entries), pool.model, {"rows": rows}, provenance()), rows


def _scores(config: ReproduceConfig, scoring_pool: CandidatePool, split: str, tasks: tuple[str, ...], samples: int,
            name: str, model, tokenizer, log: dict) -> Path:
    """Every document of ``tasks`` (``samples`` each, from ``split``) under every set of the scoring pool:
    the routers' labels on the calibration split, the tables' scores on the evaluation split."""
    pool_dir = config.work_dir / "scoring-pool"
    scoring_pool.save_pretrained(pool_dir)
    label_config = LabelConfig(pool=str(pool_dir), out=str(config.folder / name), tasks=tasks, samples=samples,
                               split=split, run_dir=str(config.work_dir / name.replace("/", "-")),
                               progress=config.progress, quantize=config.quantize,
                               quantize_head=config.quantize_head)
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
              "labels": Labels.load(labels_dir).identity}
    shipped = [DEFAULT_ARTIFACT] if config.model == "default" else []
    elsewhere = shipped + [p for p in _found(config.reuse_root, "training.json") if (p / "pudding.json").exists()]
    found = find_reusable(config.folder / "routers" / spec.name, elsewhere,
                          lambda folder: differing_keys(router_identity(folder), wanted), f"router {spec.name}")
    if found is not None:
        log[f"router {spec.name}"] = {"reused": str(found)}
        return PuddingModel.from_pretrained(found, model=model, tokenizer=tokenizer, quantize=config.quantize,
                                            quantize_head=config.quantize_head), found
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


# --- stage 4: rows from scores ------------------------------------------------------------------------------


def mean_stderr(values: list[float]) -> dict[str, float]:
    return asdict(mean_with_stderr(values))


def _correct_at(data: RoutingData, chosen: list[int]) -> list[float]:
    """Per document, whether the scoring-pool column chosen for it answers it correctly (0/1)."""
    return [data.correct[i, c].item() for i, c in enumerate(chosen)]


def _restricted_argmax(scores: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    mask = torch.full((scores.shape[1],), float("-inf"))
    mask[allowed] = 0.0
    return (scores + mask).argmax(1)


@dataclass(frozen=True)
class Routed:
    """A trained router on one split: its scores and the scoring-pool column of each of its sets."""

    pudding: PuddingModel
    scores: torch.Tensor  # documents x the router's sets
    columns: list[int]

    def chosen(self, allowed: list[int] | None = None) -> list[int]:
        """Scoring-pool column per document: the router's own choice (safe routing included), or its argmax
        restricted to the sets at ``allowed`` (the ablations that shrink the paper's pool)."""
        picks = (self.pudding.router.choose(self.scores) if allowed is None
                 else _restricted_argmax(self.scores, allowed))
        return [self.columns[int(i)] for i in picks]


def _best_by(values: torch.Tensor, columns: list[int]) -> int:
    """The column among ``columns`` with the highest value (first on ties)."""
    return columns[int(values[columns].argmax())]


def _static_choices(calibration: RoutingData, train: list[int], pool_columns: list[int], candidates: list[int]
                    ) -> dict[str, Any]:
    """The static choices made on calibration prompts only: the best TL set (the paper's label), the best set
    by accuracy, and the best set per task by accuracy (a user who knows the task)."""
    tl = calibration.labels[train].mean(0)  # the paper's label: gold mean log-likelihood
    accuracy = calibration.correct[train].mean(0)
    per_task = {}
    for task in dict.fromkeys(calibration.tasks):
        rows = [i for i in train if calibration.tasks[i] == task]
        per_task[task] = _best_by(calibration.correct[rows].mean(0), candidates)
    return {"best static TL set": _best_by(tl, pool_columns), "best static set": _best_by(accuracy, candidates),
            "task-best set": per_task}


def _static_columns(data: RoutingData, rows: dict[str, int], static: dict[str, Any], pool_columns: list[int],
                    candidates: list[int], seed: int) -> dict[str, list[float]]:
    """Per-document correctness of the static rows, the random pool set, the pool ceiling and the oracle."""
    correct = data.correct
    columns = {name: correct[:, rows[name]].tolist() for name in rows if not name.startswith("pool:")}
    for name in ("best static TL set", "best static set"):
        columns[name] = correct[:, static[name]].tolist()
    fallback = static["best static set"]  # a task without calibration data (the unseen ones)
    columns["task-best set"] = _correct_at(data, [static["task-best set"].get(t, fallback) for t in data.tasks])
    rng = random.Random(seed)
    columns["random pool set"] = [correct[i, rng.choice(pool_columns)].item() for i in range(len(data.texts))]
    # In hindsight, on the evaluation documents themselves: optimistic bounds, never a method.
    ceiling = {t: _best_by(correct[[i for i, x in enumerate(data.tasks) if x == t]].mean(0), candidates)
               for t in dict.fromkeys(data.tasks)}
    columns["pool ceiling (optimistic: best set per task on these documents)"] = _correct_at(
        data, [ceiling[t] for t in data.tasks])
    columns["oracle"] = correct[:, candidates].max(1).values.tolist()
    return columns


def _seed_mean(data: RoutingData, routed: list[Routed]) -> list[float]:
    """Per document, the fraction of router seeds whose choice answers it correctly: one router's result with
    the luck of its training seed averaged out."""
    per_seed = [_correct_at(data, r.chosen()) for r in routed]
    return [sum(values) / len(per_seed) for values in zip(*per_seed)]


def _table(data: RoutingData, columns: dict[str, list[float]], tasks: tuple[str, ...]) -> dict[str, Any]:
    by_task = {t: [i for i, task in enumerate(data.tasks) if task == t] for t in tasks}
    table = {}
    for row, values in columns.items():
        cells = {t: mean_stderr([values[i] for i in idx]) for t, idx in by_task.items() if idx}
        table[row] = {"tasks": cells, "average": sum(c["value"] for c in cells.values()) / len(cells)}
    return {"metrics": {t: get_task(t).metric for t in tasks}, "rows": table}


def paired_differences(columns: dict[str, list[float]], ours: str, others: list[str]) -> dict[str, dict]:
    """Mean per-document difference ours - other over all documents, with a normal 95% interval."""
    out = {}
    for other in others:
        diffs = [a - b for a, b in zip(columns[ours], columns[other])]
        stats = mean_stderr(diffs)
        half = 1.96 * stats["stderr"]
        out[other] = {"difference": stats["value"], "ci95": [stats["value"] - half, stats["value"] + half],
                      "n": stats["n"]}
    return out


def routing_headroom(data: RoutingData, pool: CandidatePool, pool_columns: list[int], columns: dict[str, list[float]],
                     ours: str) -> dict[str, Any]:
    """Where routing can matter at all: the documents on which the pool's sets disagree.

    On a document that every set gets right (or every set gets wrong) no choice of set changes the score, so
    the gap between PuDDing, the static sets and the oracle lives entirely on the "mixed" documents.
    How alike the sets are (blocks shared per pair) is the structural reason for a small gap.
    """
    right = data.correct[:, pool_columns]
    all_right, all_wrong = right.min(1).values == 1, right.max(1).values == 0
    mixed = [i for i in range(len(right)) if not (all_right[i] or all_wrong[i])]
    shared = [len(set(a.blocks) & set(b.blocks)) for i, a in enumerate(pool.sets) for b in pool.sets[i + 1:]]
    k = len(pool.sets[0].blocks) if pool.sets else 0
    on_mixed = {row: mean_stderr([columns[row][i] for i in mixed]) for row in
                (ours, "best static TL set", "random pool set") if row in columns and mixed}
    if mixed:
        on_mixed["pool oracle"] = mean_stderr(right.max(1).values[mixed].tolist())
    return {"documents": len(right), "all_sets_right": int(all_right.sum()), "all_sets_wrong": int(all_wrong.sum()),
            "mixed": len(mixed), "accuracy_on_mixed": on_mixed, "k": k, "pool_sets": len(pool.sets),
            "mean_shared_blocks_per_pair": sum(shared) / len(shared) if shared else float(k)}


def render_headroom(headroom: dict[str, Any]) -> str:
    lines = [f"Where routing can matter: of {headroom['documents']} documents, every pool set is right on "
             f"{headroom['all_sets_right']} and wrong on {headroom['all_sets_wrong']}; the sets disagree on "
             f"{headroom['mixed']}. Two of the {headroom['pool_sets']} sets share "
             f"{headroom['mean_shared_blocks_per_pair']:.1f} of {headroom['k']} blocks on average.", ""]
    if headroom["accuracy_on_mixed"]:
        lines.append("Accuracy on the documents where the sets disagree: " + ", ".join(
            f"{row} {v['value']:.3f} ± {v['stderr']:.3f}" for row, v in headroom["accuracy_on_mixed"].items()) + ".")
    return "\n".join(lines) + "\n"


# --- outputs --------------------------------------------------------------------------------------------------


def render_table(title: str, table: dict[str, Any], note: str = "") -> str:
    tasks = list(table["metrics"])
    lines = [f"### {title}", "", *([note, ""] if note else []),
             "| row | " + " | ".join(f"{t} ({table['metrics'][t]})" for t in tasks) + " | average |",
             "|---" * (len(tasks) + 2) + "|"]
    for row, data in table["rows"].items():
        cells = [f"{data['tasks'][t]['value']:.3f} ± {data['tasks'][t]['stderr']:.3f}" if t in data["tasks"] else "-"
                 for t in tasks]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | **{data['average']:.3f}** |")
    n = {t: next(iter(table["rows"].values()))["tasks"][t]["n"] for t in tasks}
    lines += ["", "N per task: " + ", ".join(f"{t} {n[t]}" for t in tasks) + ". Mean ± standard error.", ""]
    return "\n".join(lines)


def _plot_omission_rates(data: RoutingData, chosen_blocks: list[tuple], total: int, path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(data.tasks))
    rates = []
    for task in tasks:
        rows = [b for b, t in zip(chosen_blocks, data.tasks) if t == task]
        rates.append([sum(block in b for b in rows) / len(rows) for block in range(total)])
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(tasks) + 1.5))
    image = ax.imshow(rates, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    ax.set(xticks=range(total), yticks=range(len(tasks)), yticklabels=tasks, xlabel="block",
           title="How often the router omits each block, per task")
    fig.colorbar(image, ax=ax, label="omission rate")
    fig.tight_layout()
    atomic_write_figure(fig, path)
    return {t: r for t, r in zip(tasks, rates)}


def _plot_convergence(router_dirs: dict[str, Path], path: Path) -> None:
    """Validation loss per epoch of every router (the convergence curves the reviewers asked for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, folder in router_dirs.items():
        history_file = Path(folder) / "training.json"
        if not history_file.exists():
            continue
        history = json.loads(history_file.read_text())["history"]
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [r["val_loss"] for r in history], label=name)
        axes[1].plot(epochs, [r["val"]["top1_agreement"] for r in history], label=name)
    axes[0].set(xlabel="epoch", ylabel="validation loss (own loss, own scale)", title="router convergence")
    axes[1].set(xlabel="epoch", ylabel="top-1 agreement with the oracle", title="validation routing")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write_figure(fig, path)


def _importance_map(config: ReproduceConfig, model) -> dict[str, Any]:
    """The block-importance map (it does not depend on k): the committed one when it is this model's, else
    measured once next to the k folders."""
    root = config.reuse_root
    for folder in ([root / "importance"] if root else []) + [config.folder.parent / "importance"]:
        if (folder / IMPORTANCE_FILE).exists():
            result = load_importance(folder)
            recorded = result.get("config", {})  # maps made before quantization existed are fp32
            if (result["model"]["fingerprint"] == model_fingerprint(model.config)
                    and (recorded.get("quantize", "none"), recorded.get("quantize_head", False))
                    == (config.quantize, config.quantize_head)):
                return result
    return block_importance(ImportanceConfig(model=config.model, samples=16,
                                             out=str(config.folder.parent / "importance"),
                                             progress=config.progress, quantize=config.quantize,
                                             quantize_head=config.quantize_head))


def _average_with_stderr(row: dict[str, Any]) -> tuple[float, float]:
    """A row's average over tasks and its standard error (the tasks' documents are independent)."""
    cells = list(row["tasks"].values())
    return row["average"], sum(c["stderr"] ** 2 for c in cells) ** 0.5 / len(cells)


def _plotted_series(row: str, kind: str | None) -> str | None:
    """The accuracy-against-k series a main-table row belongs to, if any (by its recorded kind)."""
    if row in ("dense", "sleb", "best static set", "task-best set", "oracle"):
        return row
    if kind == "pudding" and row.startswith("PuDDing (paper"):
        return "PuDDing (paper)"
    if kind == "pudding-seeds" and row.startswith("PuDDing, best variant"):
        return "PuDDing, best variant (seed mean)"
    return None


def plot_accuracy_vs_k(parent: Path, budget: str) -> dict[str, Any] | None:
    """Collect ``parent/k*/main.json`` of one budget into accuracy against k (dense, SLEB, the best static
    set, the task-best set, PuDDing as the paper builds it, the best variant, the oracle); writes
    ``accuracy-vs-k-<budget>.json`` and ``.png`` in ``parent``, so budgets never mix. None if no k exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for path in parent.glob("k*/main.json"):
        data = json.loads(path.read_text())
        if data.get("config", {}).get("budget") == budget:
            runs.append((data["config"]["k"], path, data))
    if not runs:
        return None
    runs.sort(key=lambda run: run[0])
    series: dict[str, list] = {}
    for k, _, data in runs:
        for row, values in data["rows"].items():
            label = _plotted_series(row, data.get("kinds", {}).get(row))
            if label:
                series.setdefault(label, []).append([k, *_average_with_stderr(values)])
    series["dense"] = [[0, *series["dense"][0][1:]]] + series["dense"]  # dense does not depend on k
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in series.items():
        ks, means, errors = zip(*points)
        ax.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=label,
                    linestyle="--" if label in ("dense", "oracle") else "-")
    ax.set(xlabel="blocks removed (k)", ylabel="average accuracy, six paper tasks",
           xticks=[0, *[k for k, _, _ in runs]],
           title=f"Accuracy against k ({budget} budget; bars: standard error)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, parent / f"accuracy-vs-k-{budget}.png")
    result = {"budget": budget, "series": {label: [dict(zip(("k", "average", "stderr"), p)) for p in points]
                                          for label, points in series.items()},
              "sources": [{"k": k, "file": str(path), "commit": data["provenance"]["git"].get("commit"),
                           "date": data["provenance"]["date"]} for k, path, data in runs],
              "provenance": provenance()}
    atomic_write_json(parent / f"accuracy-vs-k-{budget}.json", result)
    return result


PAPER_ROW = "PuDDing (paper: {name})"
BEST_ROW = "PuDDing, best variant ({name})"
SEEDS_SUFFIX = ", mean of {n} seeds)"


def _variant_specs(config: ReproduceConfig) -> list[RouterSpec]:
    """The routing variants: label target x pool x safe routing, each with the paper router's kind and loss
    (seed 0). The paper's own configuration (tl, its pool, argmax) is the first and keeps its name."""
    if not config.variants:
        return []
    kind, loss = config.routers[0]
    specs = []
    for target in TARGETS:
        for pool in POOL_VARIANTS:
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
    # The pool size, chosen on calibration data: the n best sets of pool + baselines by training-prompt accuracy,
    # routed with the best target and safety found on that pool.
    wide = max((spec for spec in grid if spec.pool == "pool+baselines"),
               key=lambda spec: _score_key(scores[spec.name]))
    train_rows, _ = split_rows(calibration.texts, VAL_FRACTION)
    wide_columns = pools["pool+baselines"][0].config["columns"]
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
        out[name] = Routed(pudding, pudding.router.scores(texts), columns)
    return out


def _column_of(scoring_pool: CandidatePool, blocks: tuple) -> int:
    return next(i for i, entry in enumerate(scoring_pool.sets) if entry.blocks == blocks)


@locks_output("folder", "work_dir")
def reproduce(config: ReproduceConfig) -> dict[str, Any]:
    """Run every stage and write the tables; returns the summary."""
    stages, log = Stages(), {}
    sizes = config.sizes
    with stages("load model"):
        model, tokenizer = load_model(config.model, quantize=config.quantize, quantize_head=config.quantize_head)
    fingerprint = model_fingerprint(model.config)
    with stages("pool and baselines"):
        pool = _pool(config, "pool", fingerprint, log)
        pool.check_model(model.config)
        baselines = _pool(config, "baselines", fingerprint, log)
    scoring_pool, rows = _scoring_pool(pool, baselines)
    with stages("calibration labels"):
        labels_dir = _scores(config, scoring_pool, "calibration", PAPER_TASKS, sizes.label_docs, "labels", model,
                             tokenizer, log)
    with stages("evaluation scores"):
        main_dir = _scores(config, scoring_pool, "evaluation", PAPER_TASKS, sizes.paper_docs, "scores/paper-tasks",
                           model, tokenizer, log)
        unseen_dir = _scores(config, scoring_pool, "evaluation", UNSEEN_TASKS, sizes.unseen_docs,
                             "scores/unseen-tasks", model, tokenizer, log)
    pool_columns = [rows[f"pool:{i}"] for i in range(len(pool.sets))]
    candidates = list(dict.fromkeys(pool_columns + [c for name, c in rows.items()
                                                    if name != "dense" and not name.startswith("pool:")]))
    pools = {"scoring": (scoring_pool, config.work_dir / "scoring-pool"),
             "pool": _sub_pool(scoring_pool, pool_columns, "pool", config.work_dir),
             "pool+baselines": _sub_pool(scoring_pool, candidates, "pool+baselines", config.work_dir)}
    # The paper-pool labels are saved next to the union ones, so the paper's routers train on exactly the
    # columns they route over (Labels.for_pool restricts; nothing is scored again).
    calibration = routing_data(Labels.load(labels_dir).for_pool(scoring_pool))
    with stages("routers"):
        trained, selection = _train_routers(config, pools, labels_dir, calibration, scoring_pool, model, tokenizer,
                                            log)
    with stages("tables and plots"):
        summary = _write_tables(config, pool, pools, rows, pool_columns, candidates, calibration, trained, selection,
                                Labels.load(main_dir).for_pool(scoring_pool),
                                Labels.load(unseen_dir).for_pool(scoring_pool), model, log)
    stamp = {"config": asdict(config), "budget": asdict(sizes), "seconds": stages.seconds, "artifacts": log,
             "provenance": provenance()}
    atomic_write_json(config.folder / "stages.json", stamp)
    return summary


def _write_tables(config: ReproduceConfig, pool: CandidatePool, pools: dict, rows: dict[str, int],
                  pool_columns: list[int], candidates: list[int], calibration: RoutingData, trained: dict,
                  selection: dict, main_scores: Labels, unseen_scores: Labels, model, log: dict) -> dict[str, Any]:
    sizes, out = config.sizes, config.folder
    train_rows, _ = split_rows(calibration.texts, VAL_FRACTION)
    static = _static_choices(calibration, train_rows, pool_columns, candidates)
    paper_name, seeds = config.default_router, config.seed_routers
    paper_row = PAPER_ROW.format(name=paper_name)
    paper_mean = paper_row[:-1] + SEEDS_SUFFIX.format(n=len(seeds))
    best = selection.get("best")
    best_row = BEST_ROW.format(name=best) if best else None
    best_seeds = [best] + [f"{best}-seed{s}" for s in range(1, config.router_seeds)] if best else []
    best_mean = best_row[:-1] + SEEDS_SUFFIX.format(n=len(best_seeds)) if best else None
    kinds: dict[str, str] = {}
    stamp = {"config": asdict(config), "budget": {"paper_tasks": sizes.paper_docs, "unseen_tasks": sizes.unseen_docs,
                                                  "calibration_labels": sizes.label_docs,
                                                  "search": sizes.search_docs},
             "pool": pool.fingerprint(), "artifacts": log, "provenance": provenance()}
    precision = "" if config.quantize == "none" else (f", {config.quantize} model in every stage"
                                                      + (" (LM head too)" if config.quantize_head else ""))
    tables, markdown = {}, [f"# PuDDing reproduction on {_slug(config.model)}, k={config.k}{precision} "
                            f"(budget {config.budget}: "
                            f"{sizes.paper_docs} documents per paper task, {sizes.unseen_docs} per unseen task; "
                            f"{sizes.label_docs} calibration prompts per task for the routers, "
                            f"{sizes.search_docs} for the searches)", ""]
    static_rows = ["dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "best static set",
                   "task-best set", "random pool set"]
    routed_main = None
    for name, scores, tasks in (("main", main_scores, PAPER_TASKS), ("generalisation", unseen_scores, UNSEEN_TASKS)):
        data = routing_data(scores)
        # Every router reads the main table's prompts (the ablations use them all); the unseen tasks need
        # only the rows' own routers.
        needed = (trained if name == "main"
                  else {n: trained[n] for n in dict.fromkeys([paper_name, *seeds, *best_seeds])})
        routed = _routed(needed, pools, data.texts)
        routed_main = routed_main or routed
        columns = _static_columns(data, rows, static, pool_columns, candidates, config.seed)
        columns[paper_row] = _correct_at(data, routed[paper_name].chosen())
        if len(seeds) > 1:
            columns[paper_mean] = _seed_mean(data, [routed[s] for s in seeds])
        if best:
            columns[best_row] = _correct_at(data, routed[best].chosen())
            if len(best_seeds) > 1:
                columns[best_mean] = _seed_mean(data, [routed[s] for s in best_seeds])
        ordered = {r: columns[r] for r in static_rows if r in columns}
        ordered.update({r: v for r, v in columns.items()
                        if r not in ordered and not r.startswith(("pool ceiling", "oracle"))})
        ordered.update({r: v for r, v in columns.items() if r.startswith(("pool ceiling", "oracle"))})
        for row in ordered:
            kinds[row] = ("static" if row in static_rows else "bound" if row.startswith(("pool ceiling", "oracle"))
                          else "pudding-seeds" if row.endswith("seeds)") else "pudding")
        table = _table(data, ordered, tasks)
        table["kinds"] = kinds
        others = [r for r in ordered if r in static_rows]
        table["paired_differences"] = {row: paired_differences(ordered, row, others)
                                       for row in (paper_row, paper_mean, best_row, best_mean) if row in ordered}
        table["headroom"] = routing_headroom(data, pool, pool_columns, ordered, paper_row)
        if name == "main" and best:
            table["switch_rate"] = _switch_rates(routed, data)
        tables[name] = table
        atomic_write_json(out / f"{name}.json", {**stamp, **table})
        markdown.append(render_table(
            "Main table (paper Table 1)" if name == "main" else "Unseen tasks (paper Table 5)", table))
        for row, differences in table["paired_differences"].items():
            markdown.append(render_paired(differences, row))
        markdown.append(render_headroom(table["headroom"]))

    data, routed = routing_data(main_scores), routed_main
    ablations = _ablations(config, data, routed, pool, pool_columns, calibration, train_rows, selection)
    for name, table in ablations.items():
        atomic_write_json(out / f"ablation-{name}.json", {**stamp, **table})
        markdown.append(render_table(f"Ablation: {name.replace('_', ' ')}", table))
        if "spread" in table:
            spread = table["spread"]
            markdown.append(f"Average over the {spread['seeds']} seeds: {spread['mean']:.3f}, standard deviation "
                            f"{spread['sd']:.3f}, range {spread['min']:.3f} to {spread['max']:.3f}.\n")
        if "selection" in table:
            markdown.append(render_selection(table["selection"]))

    chosen = routed[best or paper_name].chosen()
    blocks_of = {c: pools["scoring"][0].sets[c].blocks for c in set(chosen)}
    rates = _plot_omission_rates(data, [blocks_of[c] for c in chosen], model.config.num_hidden_layers,
                                 out / "omission-rates.png")
    atomic_write_json(out / "omission-rates.json", {**stamp, "router": best or paper_name, "rates": rates})
    markdown += ["![omission rates](omission-rates.png)", ""]
    plotted = [name for _, _, seed, name in config.router_specs if seed == 0] + ([best] if best else [])
    _plot_convergence({name: trained[name][1] for name in plotted}, out / "router-convergence.png")
    markdown += ["![router convergence](router-convergence.png)", ""]
    tl_sets = {s.task: entry.blocks for entry in pool.sets for s in entry.sources if s.objective == "tl"}
    plot_heatmap(_importance_map(config, model), out / "block-importance.png", marks=tl_sets,
                 marks_label=f"the task's TL set at k={config.k}")
    markdown += ["![block importance](block-importance.png)", ""]
    if plot_accuracy_vs_k(out.parent, config.budget):
        markdown += ["Accuracy against k, over every k reproduced with this budget: "
                     f"[../accuracy-vs-k-{config.budget}.png](../accuracy-vs-k-{config.budget}.png)", ""]
    atomic_write_text(out / "README.md", "\n".join(markdown)
                      + f"\nCommand: `{' '.join(stamp['provenance']['command'])}`; "
                      f"commit {stamp['provenance']['git'].get('commit', '?')}; {stamp['provenance']['date']}.\n")
    return {"tables": tables, "ablations": ablations, "selection": selection, "out": str(out)}


def _switch_rates(routed: dict[str, Routed], data: RoutingData) -> dict[str, float]:
    """For each safe router, the share of evaluation documents routed away from its default set."""
    rates = {}
    for name, r in routed.items():
        default = r.pudding.router.config.default_set
        if default is not None:
            rates[name] = sum(c != r.columns[default] for c in r.chosen()) / len(data.texts)
    return rates


def _ablations(config: ReproduceConfig, data: RoutingData, routed: dict[str, Routed], pool: CandidatePool,
               pool_columns: list[int], calibration: RoutingData, train_rows: list[int], selection: dict
               ) -> dict[str, dict]:
    paper_name, seeds = config.default_router, config.seed_routers
    ablations = {}
    # router type and loss (seed 0 each), then the paper's router over its seeds
    kinds = {f"PuDDing ({name})": _correct_at(data, routed[name].chosen())
             for _, _, seed, name in config.router_specs if seed == 0}
    ablations["router"] = _table(data, kinds, PAPER_TASKS)
    by_seed = {f"PuDDing ({name})": _correct_at(data, routed[name].chosen()) for name in seeds}
    ablations["router_seed"] = _table(data, by_seed, PAPER_TASKS)
    averages = [row["average"] for row in ablations["router_seed"]["rows"].values()]
    ablations["router_seed"]["spread"] = {"seeds": len(averages), "mean": statistics.fmean(averages),
                                          "sd": statistics.stdev(averages) if len(averages) > 1 else 0.0,
                                          "min": min(averages), "max": max(averages)}
    # candidate-search objective and pool size: restrict the paper router's choice
    paper = routed[paper_name]
    restricted = {}
    for objective in ("tl", "margin"):
        allowed = [i for i, e in enumerate(pool.sets) if any(s.objective == objective for s in e.sources)]
        if allowed:
            restricted[f"PuDDing, {objective} sets only ({len(allowed)})"] = _correct_at(data, paper.chosen(allowed))
    ablations["objective"] = _table(data, restricted, PAPER_TASKS)
    ranking = calibration.labels[train_rows][:, pool_columns].mean(0).argsort(descending=True).tolist()
    sizes = {f"{size} sets": _correct_at(data, paper.chosen(ranking[:size]))
             for size in sorted({1, 3, 5, len(pool.sets)}) if size <= len(pool.sets)}
    ablations["pool_size"] = _table(data, sizes, PAPER_TASKS)
    if selection.get("grid"):
        names = selection["grid"] + selection["sized"]
        table = _table(data, {f"PuDDing ({name})": _correct_at(data, routed[name].chosen()) for name in names},
                       PAPER_TASKS)
        table["selection"] = {**selection, "evaluation_switch_rate": _switch_rates(
            {name: routed[name] for name in names}, data)}
        ablations["routing"] = table
    return ablations


def render_selection(selection: dict[str, Any]) -> str:
    lines = ["Validation accuracy on calibration prompts (held out from each router's training; cross-fitted for "
             "safe routing), which chose the best variant; share of evaluation documents routed away from the "
             "default set for the safe ones:", ""]
    for name, value in selection["validation_accuracy"].items():
        switch = selection["evaluation_switch_rate"].get(name)
        lines.append(f"- {name}: {value:.3f}" + (f", switches on {switch:.1%}" if switch is not None else "")
                     + (" **(chosen)**" if name == selection["best"] else ""))
    lines.append(f"\nPool size chosen on calibration data: {selection['pool_size_chosen']}.")
    return "\n".join(lines) + "\n"


def render_paired(differences: dict[str, dict], ours: str) -> str:
    lines = [f"Paired differences, {ours} minus each static row, over all documents (95% interval):", ""]
    for other, d in differences.items():
        lines.append(f"- vs {other}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (N={d['n']})")
    return "\n".join(lines) + "\n"


