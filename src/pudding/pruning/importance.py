"""The block-importance map (the paper's Figure 2): what removing each single block costs, per task.

For every task and every block, the model is scored on the task's calibration documents with only that
block removed. Two numbers per cell, each relative to the dense model:

- the change in task likelihood (the gold answer's mean per-token log-likelihood; negative = worse);
- the change in the task's primary metric (acc or acc_norm, as lm-eval defines it).

If block importance did not depend on the task, every row of the map would look alike.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.fields import QuantizationFields
from pudding.core.load import DEFAULT_MODEL, load_config, load_model, model_fingerprint, model_name
from pudding.core.metrics import aggregate, scores_by_doc
from pudding.core.provenance import atomic_write_figure, atomic_write_json, provenance
from pudding.core.score import LikelihoodScorer
from pudding.core.tasks import PAPER_TASKS, get_task
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pruning.candidates import calibration_docs
from pudding.pruning.search import OBJECTIVES

IMPORTANCE_FILE = "importance.json"
HEATMAP_FILE = "importance.png"


@dataclass(frozen=True)
class ImportanceConfig(QuantizationFields):
    """Settings of ``pudding importance``; each field's help text is its documentation."""

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "'default', a .gguf file, a model folder or a hub id"})
    tasks: tuple[str, ...] = field(default=PAPER_TASKS, metadata={"help": "comma-separated calibration tasks"})
    samples: int = field(default=64, metadata={"type": "positive_int", "help": "calibration documents per task"})
    max_length: int = field(default=256, metadata={"type": "positive_int", "help": "tokens kept per request"})
    max_batch_tokens: int = field(default=512, metadata={
        "flag": "--batch-tokens", "type": "positive_int", "help": "padded tokens per forward pass"})
    out: str = field(default="runs/importance", metadata={
        "required": True, "help": "folder for importance.json and importance.png"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        super().__post_init__()
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        tasks = tuple(dict.fromkeys(t.strip() for t in tasks if t and t.strip()))
        if not tasks:
            raise ConfigError("no tasks given")
        for task in tasks:
            get_task(task)
        object.__setattr__(self, "tasks", tasks)
        if self.samples < 1 or self.max_length < 1 or self.max_batch_tokens < 1:
            raise ConfigError("samples, max_length and max_batch_tokens must be positive")


def _task_row(scorer: LikelihoodScorer, task: str, docs, n_blocks: int) -> dict[str, Any]:
    evaluator = CandidateEvaluator(scorer, OBJECTIVES["margin"].requests(docs))
    omissions = [(), *[(b,) for b in range(n_blocks)]]
    metric = get_task(task).metric
    scored = [scores_by_doc(docs, scores) for scores in evaluator.evaluate(omissions)]
    tl = [aggregate(s, "task_likelihood").value for s in scored]
    acc = [aggregate(s, metric).value for s in scored]
    return {"metric": metric, "n": len(docs), "dense_task_likelihood": tl[0], f"dense_{metric}": acc[0],
            "dense_metric": acc[0], "delta_task_likelihood": [v - tl[0] for v in tl[1:]],
            "delta_metric": [v - acc[0] for v in acc[1:]], "reuse_ratio": round(evaluator.stats.ratio, 3)}


def block_importance(config: ImportanceConfig) -> dict[str, Any]:
    """Measure the map, write ``importance.json`` and ``importance.png`` to ``config.out``, return the data."""
    n_blocks = load_config(config.model).num_hidden_layers
    docs = {task: calibration_docs(task, config.samples) for task in config.tasks}
    model, tokenizer = load_model(config.model, **config.quantization)
    scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=config.max_batch_tokens, max_length=config.max_length)
    rows = {}
    for task in config.tasks:
        if config.progress:
            print(f"importance: {task} ({len(docs[task])} docs x {n_blocks + 1} settings)", flush=True)
        rows[task] = _task_row(scorer, task, docs[task], n_blocks)
    result = {"model": {"spec": config.model, "name": model_name(config.model),
                        "fingerprint": model_fingerprint(model.config)},
              "config": dataclasses.asdict(config), "provenance": provenance(), "blocks": list(range(n_blocks)),
              "tasks": rows}
    atomic_write_json(Path(config.out) / IMPORTANCE_FILE, result)
    plot_heatmap(result, Path(config.out) / HEATMAP_FILE)
    return result


def plot_heatmap(result: dict[str, Any], path: Path, marks: dict[str, tuple[int, ...]] | None = None,
                 marks_label: str = "") -> Path:
    """Two heatmaps (tasks x blocks): change in task likelihood, and change in accuracy, from dropping one block.

    ``marks`` (task -> blocks) draws a cross on those cells, e.g. the set each task's search removes, so the
    map shows whether the search drops the blocks that matter least alone.
    """
    import numpy as np

    from pudding.core.extras import pyplot

    plt = pyplot()

    tasks = list(result["tasks"])
    panels = [("delta_task_likelihood", "change in gold mean log-likelihood (nats/token)"),
              ("delta_metric", "change in accuracy (acc / acc_norm)")]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(result["blocks"]) + 3), 1.1 * len(tasks) * 2 + 2.5))
    for ax, (key, title) in zip(axes, panels):
        values = np.array([result["tasks"][t][key] for t in tasks])
        limit = float(np.nanmax(np.abs(values))) or 1.0
        image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_yticks(range(len(tasks)), [f"{t} ({result['tasks'][t]['metric']})" for t in tasks])
        ax.set_xticks(range(len(result["blocks"])), result["blocks"], fontsize=7)
        ax.set_xlabel("block removed alone")
        ax.set_title(title + (f"; x = {marks_label}" if marks_label else ""), fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.025)
        for row, task in enumerate(tasks):
            blocks = (marks or {}).get(task, ())
            ax.scatter(list(blocks), [row] * len(blocks), marker="x", color="black", s=25)
        ax.set(xlim=(-0.5, len(result["blocks"]) - 0.5), ylim=(len(tasks) - 0.5, -0.5))  # as imshow set them
    git = result["provenance"]["git"]["commit"] or "unknown"
    fig.suptitle(f"Block importance of {result['model']['name']} "
                 f"({result['config']['samples']} calibration docs per task; commit {git[:8]})", fontsize=11)
    fig.tight_layout()
    return atomic_write_figure(fig, path)


def load_importance(path: str | Path) -> dict[str, Any]:
    """Read an importance.json (or the folder holding it)."""
    path = Path(path)
    return json.loads((path / IMPORTANCE_FILE if path.is_dir() else path).read_text())
