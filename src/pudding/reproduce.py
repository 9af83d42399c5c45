"""``pudding reproduce``: the paper's tables, measured by pudding on data no stage has seen.

One resumable command:

1. reuse the committed pool, baselines, labels and routers when they were made for this model and k (by
   fingerprint), else build them. A smaller k than the committed pool's is derived from it exactly
   (:func:`pudding.candidates.shrink_pool`: a greedy search's first k removals are the k-block search);
2. score every evaluation document of the paper's six tasks and of six unseen tasks under every set that
   any row needs (dense, each baseline, each pool set): this is the only expensive step, sharded and
   checkpointed like ``pudding label`` (it *is* ``pudding label`` on the evaluation split);
3. evaluate every row from those per-document scores, without running the LLM again: the static rows,
   a random pool set, PuDDing (each router's choice on the prompt), and the oracle (in hindsight, the pool
   set that answers each document correctly if any does);
4. write one JSON per table (with provenance), a Markdown rendering and the plots, and redraw accuracy
   against k from every k reproduced with the same budget.

Budgets (``--budget``) fix the documents per task and are stated in every table. With the committed
artifacts reused, the default ``small`` takes well under an hour per k on a 2-core CPU; building the pool
from nothing is the expensive part (see the README).
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pudding.candidates import (PAPER_TASKS, CandidatePool, PoolConfig, PoolEntry, SetSource, build_baselines,
                                build_pool, shrink_pool)
from pudding.errors import ConfigError
from pudding.importance import IMPORTANCE_FILE, ImportanceConfig, block_importance, load_importance, plot_heatmap
from pudding.labels import LabelConfig, Labels, build_labels
from pudding.load import load_model, model_fingerprint, model_name
from pudding.metrics import mean_with_stderr
from pudding.provenance import atomic_write_figure, atomic_write_json, atomic_write_text, provenance
from pudding.routed import DEFAULT_ARTIFACT, PuddingModel
from pudding.tasks import get_task
from pudding.train import RoutingData, TrainConfig, routing_data, train_router

UNSEEN_TASKS = ("mmlu", "openbookqa", "sciq", "commonsense_qa", "social_iqa", "medmcqa")
BUDGETS = {  # documents per task: (paper tasks, unseen tasks, calibration labels for the routers)
    "tiny": (8, 4, 12),
    "small": (30, 15, 64),
    "full": (500, 200, 256),
}
COMMITTED = {"default": Path("results/smollm2")}
ROUTER_ABLATIONS = (("embed-mlp", "mse"), ("embed-mlp", "ce"), ("llm-embed", "mse"), ("encoder", "mse"))


@dataclass(frozen=True)
class ReproduceConfig:
    """Settings of ``pudding reproduce``."""

    model: str = "default"
    k: int = 6
    budget: str = "small"
    out: str | None = None  # default: results/<model>/k<k>
    run_dir: str = "runs/reproduce"
    routers: tuple[tuple[str, str], ...] = ROUTER_ABLATIONS
    seed: int = 0
    router_seeds: int = 5  # the first router is also trained with seeds 1..n-1: how much is luck of the seed
    progress: bool = True

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise ConfigError(f"unknown budget {self.budget!r}; known: {', '.join(BUDGETS)}")
        if self.router_seeds < 1:
            raise ConfigError(f"router_seeds must be at least 1, got {self.router_seeds}")

    @property
    def default_router(self) -> str:
        return f"{self.routers[0][0]}-{self.routers[0][1]}"

    @property
    def router_specs(self) -> list[tuple[str, str, int, str]]:
        """(kind, loss, seed, name) of every router to train: each ablation router, then the first one's seeds."""
        specs = [(kind, loss, 0, f"{kind}-{loss}") for kind, loss in self.routers]
        kind, loss = self.routers[0]
        return specs + [(kind, loss, seed, f"{kind}-{loss}-seed{seed}") for seed in range(1, self.router_seeds)]

    @property
    def seed_routers(self) -> list[str]:
        return [name for kind, loss, seed, name in self.router_specs if (kind, loss) == self.routers[0]]

    @property
    def folder(self) -> Path:
        return Path(self.out) if self.out else Path("results") / _slug(self.model) / f"k{self.k}"

    @property
    def work_dir(self) -> Path:
        """Checkpoints of this model and k: runs for another k (or model) never collide in one ``run_dir``."""
        return Path(self.run_dir) / _slug(self.model) / f"k{self.k}"


def _slug(spec: str) -> str:
    return "smollm2" if spec == "default" else model_name(spec).replace("/", "--")


# --- stage 1: the artifacts the rows need --------------------------------------------------------------------


def _committed(config: ReproduceConfig) -> Path | None:
    return COMMITTED.get(config.model)


def _reuse_pool(config: ReproduceConfig, name: str) -> CandidatePool | None:
    """This k's pool (or baselines) from an earlier run, else the committed one, shrunk exactly to this k
    when it was searched at a larger k (:func:`pudding.candidates.shrink_pool`); None if neither exists."""
    mine = config.folder / name / "pool.json"
    if mine.exists():
        return CandidatePool.from_pretrained(mine)
    committed = _committed(config)
    if committed and (committed / name / "pool.json").exists():
        pool = CandidatePool.from_pretrained(committed / name)
        if pool.config.get("k") == config.k:
            return pool
        if isinstance(pool.config.get("k"), int) and pool.config["k"] > config.k:
            shrunk = shrink_pool(pool, config.k)
            shrunk.save_pretrained(config.folder / name)
            return shrunk
    return None


def _pool(config: ReproduceConfig) -> CandidatePool:
    return _reuse_pool(config, "pool") or build_pool(
        PoolConfig(model=config.model, k=config.k, run_dir=str(config.work_dir / "pool"),
                   out=str(config.folder / "pool"), progress=config.progress))


def _baselines(config: ReproduceConfig) -> CandidatePool:
    return _reuse_pool(config, "baselines") or build_baselines(
        PoolConfig(model=config.model, k=config.k, objectives=("ppl",), run_dir=str(config.work_dir / "baselines"),
                   out=str(config.folder / "baselines"), progress=config.progress))


def _calibration_labels(config: ReproduceConfig, pool: CandidatePool, pool_dir: Path, model=None, tokenizer=None
                        ) -> Path:
    """Router training labels: the committed ones when they were made for this pool, else this k's own."""
    committed = _committed(config)
    folders = [committed / "labels", committed / f"k{config.k}" / "labels"] if committed else []
    for folder in folders + [config.folder / "labels"]:
        if (folder / "labels.json").exists() and Labels.load(folder).meta.get("pool") == pool.fingerprint():
            return folder
    out = config.folder / "labels"
    build_labels(LabelConfig(pool=str(pool_dir), out=str(out), samples=BUDGETS[config.budget][2],
                             run_dir=str(config.work_dir / "labels"), progress=config.progress),
                 model=model, tokenizer=tokenizer)
    return out


def _routers(config: ReproduceConfig, pool: CandidatePool, pool_dir: Path, model, tokenizer
             ) -> tuple[dict[str, PuddingModel], dict[str, Path]]:
    """One PuddingModel per (router kind, loss, seed), and its folder: committed ones when they match, else trained."""
    routers, folders = {}, {}
    labels_dir = None
    for kind, loss, seed, name in config.router_specs:
        # Reused only when made for this very pool (fingerprint), so another k or model never matches.
        shipped = config.model == "default" and (kind, loss, seed) == ("embed-mlp", "mse", 0)
        candidates = [DEFAULT_ARTIFACT] if shipped else []
        committed = _committed(config)
        candidates += ([committed / f"k{config.k}" / "routers" / name] if committed else [])
        candidates += [config.folder / "routers" / name]
        found = None
        for folder in candidates:
            if (folder / "pudding.json").exists() and (folder / "router.safetensors").exists():
                candidate = PuddingModel.from_pretrained(folder, model=model, tokenizer=tokenizer)
                if candidate.pool.fingerprint() == pool.fingerprint():
                    found, folders[name] = candidate, folder
                    break
        if found is None:
            labels_dir = labels_dir or _calibration_labels(config, pool, pool_dir, model, tokenizer)
            found = train_router(TrainConfig(labels=str(labels_dir), pool=str(pool_dir),
                                             out=str(config.folder / "routers" / name), router=kind, loss=loss,
                                             seed=seed, progress=config.progress), model=model, tokenizer=tokenizer)
            folders[name] = config.folder / "routers" / name
        routers[name] = found
    return routers, folders


# --- stage 2: per-document scores under every set -----------------------------------------------------------


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


def _eval_scores(config: ReproduceConfig, scoring_pool: CandidatePool, tasks: tuple[str, ...], samples: int,
                 name: str, model, tokenizer) -> Labels:
    folder = config.folder / "scores" / name
    pool_dir = config.work_dir / "scoring-pool"
    scoring_pool.save_pretrained(pool_dir)
    if not (folder / "labels.json").exists() or Labels.load(folder).meta.get("pool") != scoring_pool.fingerprint():
        build_labels(LabelConfig(pool=str(pool_dir), out=str(folder), tasks=tasks, samples=samples,
                                 split="evaluation", run_dir=str(config.work_dir / f"scores-{name}"),
                                 progress=config.progress), model=model, tokenizer=tokenizer)
    return Labels.load(folder)


# --- stage 3: rows from scores ------------------------------------------------------------------------------


def mean_stderr(values: list[float]) -> dict[str, float]:
    return asdict(mean_with_stderr(values))


def _route_indices(scores: torch.Tensor, allowed: list[int], pool_rows: list[int]) -> list[int]:
    """Scoring-pool column of the set each document is routed to, given the router's per-set ``scores``
    (documents x pool sets), with the argmax restricted to the pool sets in ``allowed``."""
    mask = torch.full((scores.shape[1],), float("-inf"))
    mask[allowed] = 0.0
    return [pool_rows[int(i)] for i in (scores + mask).argmax(1)]


def _pool_rows(rows: dict[str, int], pool_size: int) -> list[int]:
    """Scoring-pool column of each pool set, in pool order."""
    return [rows[f"pool:{i}"] for i in range(pool_size)]


def _routed_correct(data: RoutingData, scores: torch.Tensor, allowed: list[int], pool_rows: list[int]) -> list[float]:
    """Per document, whether the set the router picks among ``allowed`` answers it correctly (0/1)."""
    chosen = _route_indices(scores, allowed, pool_rows)
    return [data.correct[i, c].item() for i, c in enumerate(chosen)]


def _row_columns(data: RoutingData, rows: dict[str, int], pool_size: int, router_scores: dict[str, torch.Tensor],
                 static_best: int, seed: int) -> dict[str, list[float]]:
    """Per-document correctness (0/1) for every row of the tables; one PuDDing row per router's scores."""
    n = len(data.texts)
    pool_rows = _pool_rows(rows, pool_size)
    correct = data.correct
    columns = {name: correct[:, rows[name]].tolist() for name in rows if not name.startswith("pool:")}
    columns["best static TL set"] = correct[:, rows[f"pool:{static_best}"]].tolist()
    rng = random.Random(seed)
    columns["random pool set"] = [correct[i, rng.choice(pool_rows)].item() for i in range(n)]
    for name, scores in router_scores.items():
        columns[f"PuDDing ({name})"] = _routed_correct(data, scores, list(range(pool_size)), pool_rows)
    columns["oracle"] = correct[:, pool_rows].max(1).values.tolist()
    return columns


def _seed_mean(data: RoutingData, rows: dict[str, int], pool_size: int, seed_scores: list[torch.Tensor]
               ) -> list[float]:
    """Per document, the fraction of router seeds whose choice answers it correctly: PuDDing with the luck of
    one training seed averaged out."""
    pool_rows = _pool_rows(rows, pool_size)
    per_seed = [_routed_correct(data, scores, list(range(pool_size)), pool_rows) for scores in seed_scores]
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


def routing_headroom(data: RoutingData, pool: CandidatePool, rows: dict[str, int], columns: dict[str, list[float]],
                     ours: str) -> dict[str, Any]:
    """Where routing can matter at all: the documents on which the pool's sets disagree.

    On a document that every set gets right (or every set gets wrong) no choice of set changes the score, so
    the gap between PuDDing, the static sets and the oracle lives entirely on the "mixed" documents.
    How alike the sets are (blocks shared per pair) is the structural reason for a small gap.
    """
    right = data.correct[:, _pool_rows(rows, len(pool.sets))]
    all_right, all_wrong = right.min(1).values == 1, right.max(1).values == 0
    mixed = [i for i in range(len(right)) if not (all_right[i] or all_wrong[i])]
    shared = [len(set(a.blocks) & set(b.blocks)) for i, a in enumerate(pool.sets) for b in pool.sets[i + 1:]]
    k = len(pool.sets[0].blocks) if pool.sets else 0
    on_mixed = {row: mean_stderr([columns[row][i] for i in mixed]) for row in
                (ours, "best static TL set", "random pool set", "oracle") if row in columns and mixed}
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
    lines = [f"### {title}", "", *([note, ""] if note else []), "| row | " + " | ".join(f"{t} ({table['metrics'][t]})" for t in tasks)
             + " | average |", "|---" * (len(tasks) + 2) + "|"]
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
    committed = _committed(config)
    for folder in ([committed / "importance"] if committed else []) + [config.folder.parent / "importance"]:
        if (folder / IMPORTANCE_FILE).exists():
            result = load_importance(folder)
            if result["model"]["fingerprint"] == model_fingerprint(model.config):
                return result
    return block_importance(ImportanceConfig(model=config.model, samples=16, out=str(config.folder.parent / "importance"),
                                             progress=config.progress))


def _average_with_stderr(row: dict[str, Any]) -> tuple[float, float]:
    """A row's average over tasks and its standard error (the tasks' documents are independent)."""
    cells = list(row["tasks"].values())
    return row["average"], sum(c["stderr"] ** 2 for c in cells) ** 0.5 / len(cells)


def plot_accuracy_vs_k(parent: Path, budget: str) -> dict[str, Any] | None:
    """Collect ``parent/k*/main.json`` of one budget into accuracy against k (dense, SLEB, the best static TL
    set, PuDDing, the oracle); writes ``accuracy-vs-k-<budget>.json`` and ``.png`` in ``parent``, so budgets
    never mix. None if no k exists."""
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
            label = ("PuDDing, mean of router seeds" if "seeds)" in row else "PuDDing" if row.startswith("PuDDing")
                     else row)
            if label in ("dense", "sleb", "best static TL set", "PuDDing", "PuDDing, mean of router seeds", "oracle"):
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


def reproduce(config: ReproduceConfig) -> dict[str, Any]:
    """Run everything and write the tables; returns the summary."""
    paper_n, unseen_n, _ = BUDGETS[config.budget]
    model, tokenizer = load_model(config.model)
    pool = _pool(config)
    pool.check_model(model.config)
    baselines = _baselines(config)
    pool_dir = config.work_dir / "pool-artifact"
    pool.save_pretrained(pool_dir)
    routers, router_dirs = _routers(config, pool, pool_dir, model, tokenizer)
    scoring_pool, rows = _scoring_pool(pool, baselines)
    main_scores = _eval_scores(config, scoring_pool, PAPER_TASKS, paper_n, "paper-tasks", model, tokenizer)
    unseen_scores = _eval_scores(config, scoring_pool, UNSEEN_TASKS, unseen_n, "unseen-tasks", model, tokenizer)

    calibration = routing_data(Labels.load(_calibration_labels(config, pool, pool_dir, model, tokenizer)))
    static_best = int(calibration.labels.mean(0).argmax())  # chosen on calibration data only
    ranking = calibration.labels.mean(0).argsort(descending=True).tolist()
    default_router, seeds = config.default_router, config.seed_routers
    main_data, unseen_data = routing_data(main_scores), routing_data(unseen_scores)
    # Each router reads each prompt once; every table and ablation then restricts or reuses these scores.
    main_router_scores = {name: pudding.router.scores(main_data.texts) for name, pudding in routers.items()}
    router_scores = {"main": main_router_scores,
                     "generalisation": {name: routers[name].router.scores(unseen_data.texts) for name in seeds}}
    static_rows = ["dense", "sleb", "shortened_ppl", "taylor", "shortgpt", "best static TL set", "random pool set"]
    out = config.folder
    stamp = {"config": asdict(config), "budget": {"paper_tasks": paper_n, "unseen_tasks": unseen_n},
             "pool": pool.fingerprint(), "provenance": provenance()}
    tables, markdown = {}, [f"# PuDDing reproduction on {_slug(config.model)}, k={config.k} "
                            f"(budget {config.budget}: {paper_n} documents per paper task, {unseen_n} per unseen task)", ""]
    ours, ours_mean = f"PuDDing ({default_router})", f"PuDDing ({default_router}, mean of {len(seeds)} seeds)"
    for name, data, tasks in (("main", main_data, PAPER_TASKS), ("generalisation", unseen_data, UNSEEN_TASKS)):
        columns = _row_columns(data, rows, len(pool.sets), {default_router: router_scores[name][default_router]},
                               static_best, config.seed)
        if len(seeds) > 1:
            columns[ours_mean] = _seed_mean(data, rows, len(pool.sets), [router_scores[name][s] for s in seeds])
        ordered = {r: columns[r] for r in static_rows if r in columns}
        ordered.update({r: v for r, v in columns.items() if r not in ordered and r != "oracle"})
        ordered["oracle"] = columns["oracle"]
        table = _table(data, ordered, tasks)
        others = [r for r in ordered if r in static_rows]
        table["paired_differences"] = paired_differences(ordered, ours, others)
        if len(seeds) > 1:
            table["paired_differences_seed_mean"] = paired_differences(ordered, ours_mean, others)
        table["headroom"] = routing_headroom(data, pool, rows, ordered, ours)
        tables[name] = table
        atomic_write_json(out / f"{name}.json", {**stamp, **table})
        markdown.append(render_table(f"{'Main table (paper Table 1)' if name == 'main' else 'Unseen tasks (paper Table 5)'}",
                                     table))
        markdown.append(render_paired(table["paired_differences"], ours))
        if len(seeds) > 1:
            markdown.append(render_paired(table["paired_differences_seed_mean"], ours_mean))
        markdown.append(render_headroom(table["headroom"]))

    data, default_scores = main_data, main_router_scores[default_router]
    ablations = {}
    # router type and loss (seed 0 each), then the first router over its seeds
    ablation_routers = {name: main_router_scores[name] for _, _, seed, name in config.router_specs if seed == 0}
    columns = _row_columns(data, rows, len(pool.sets), ablation_routers, static_best, config.seed)
    ablations["router"] = _table(data, {r: v for r, v in columns.items() if r.startswith("PuDDing") or r == "oracle"},
                                 PAPER_TASKS)
    columns = _row_columns(data, rows, len(pool.sets), {s: main_router_scores[s] for s in seeds}, static_best,
                           config.seed)
    ablations["router_seed"] = _table(data, {r: v for r, v in columns.items() if r.startswith("PuDDing")}, PAPER_TASKS)
    averages = [row["average"] for row in ablations["router_seed"]["rows"].values()]
    ablations["router_seed"]["spread"] = {"seeds": len(averages), "mean": statistics.fmean(averages),
                                          "sd": statistics.stdev(averages) if len(averages) > 1 else 0.0,
                                          "min": min(averages), "max": max(averages)}
    # candidate-search objective and pool size: restrict the default router's choice
    pool_rows = _pool_rows(rows, len(pool.sets))
    restricted = {}
    for objective in ("tl", "margin"):
        allowed = [i for i, e in enumerate(pool.sets) if any(s.objective == objective for s in e.sources)]
        if allowed:
            restricted[f"PuDDing, {objective} sets only ({len(allowed)})"] = _routed_correct(
                data, default_scores, allowed, pool_rows)
    restricted["SLEB (ppl, static)"] = data.correct[:, rows["sleb"]].tolist() if "sleb" in rows else []
    ablations["objective"] = _table(data, {k: v for k, v in restricted.items() if v}, PAPER_TASKS)
    sizes = {}
    for size in sorted({1, 3, 5, len(pool.sets)}):
        if size <= len(pool.sets):
            sizes[f"{size} sets"] = _routed_correct(data, default_scores, ranking[:size], pool_rows)
    ablations["pool_size"] = _table(data, sizes, PAPER_TASKS)
    for name, table in ablations.items():
        atomic_write_json(out / f"ablation-{name}.json", {**stamp, **table})
        markdown.append(render_table(f"Ablation: {name.replace('_', ' ')}", table))
        if "spread" in table:
            spread = table["spread"]
            markdown.append(f"Average over the {spread['seeds']} seeds: {spread['mean']:.3f}, standard deviation "
                            f"{spread['sd']:.3f}, range {spread['min']:.3f} to {spread['max']:.3f}.\n")

    chosen = _route_indices(default_scores, list(range(len(pool.sets))), pool_rows)
    blocks_of = {rows[f"pool:{i}"]: pool.sets[i].blocks for i in range(len(pool.sets))}
    rates = _plot_omission_rates(data, [blocks_of[c] for c in chosen], model.config.num_hidden_layers,
                                 out / "omission-rates.png")
    atomic_write_json(out / "omission-rates.json", {**stamp, "rates": rates})
    markdown += ["![omission rates](omission-rates.png)", ""]
    _plot_convergence(router_dirs, out / "router-convergence.png")
    markdown += ["![router convergence](router-convergence.png)", ""]
    tl_sets = {s.task: entry.blocks for entry in pool.sets for s in entry.sources if s.objective == "tl"}
    plot_heatmap(_importance_map(config, model), out / "block-importance.png", marks=tl_sets,
                 marks_label=f"the task's TL set at k={config.k}")
    markdown += ["![block importance](block-importance.png)", ""]
    if plot_accuracy_vs_k(out.parent, config.budget):
        markdown += ["Accuracy against k, over every k reproduced with this budget: "
                     f"[../accuracy-vs-k-{config.budget}.png](../accuracy-vs-k-{config.budget}.png)", ""]
    atomic_write_text(out / "README.md", "\n".join(markdown) + f"\nCommand: `{' '.join(stamp['provenance']['command'])}`; "
                      f"commit {stamp['provenance']['git'].get('commit', '?')}; {stamp['provenance']['date']}.\n")
    return {"tables": tables, "ablations": ablations, "out": str(out)}


def render_paired(differences: dict[str, dict], ours: str) -> str:
    lines = [f"Paired differences, {ours} minus each static row, over all documents (95% interval):", ""]
    for other, d in differences.items():
        lines.append(f"- vs {other}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (N={d['n']})")
    return "\n".join(lines) + "\n"


