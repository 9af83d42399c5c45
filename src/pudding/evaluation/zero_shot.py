"""Zero-shot multiple-choice evaluation, dense or with blocks omitted.

One entry function, :func:`evaluate`, configured by :class:`EvalConfig`; ``pudding eval`` is a thin wrapper.
Each omission set is one row of results; the model is loaded once and every row scores the same documents.
Each finished task of a row (and each set's documents of the routed row) is saved under the output folder as it
ends, so an interrupted run resumes (:mod:`pudding.evaluation.eval_parts`).
With ``routed``, one more row runs each document without the set a PuDDing artifact's router picks for it: the
routed model as it serves, scored by the same rule as every static row.

Example::

    from pudding.evaluation.zero_shot import EvalConfig, evaluate
    result = evaluate(EvalConfig(tasks=("piqa",), omissions=((), (20, 21)), limit=50))
    result["runs"][1]["tasks"]["piqa"]["acc"]["value"]
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.fields import QuantizationFields
from pudding.core.load import DEFAULT_MODEL, load_config, load_model, model_name
from pudding.core.metrics import DocScores, aggregate, scores_by_doc
from pudding.core.omit import OmissionSet, omission_key, omit_blocks
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance
from pudding.core.quantize import check_quantized
from pudding.core.score import LikelihoodScorer, doc_requests
from pudding.core.tasks import SPLITS, MCDoc, get_task, load_docs
from pudding.evaluation.eval_parts import EvalParts, run_identity

REPORTED_METRICS = ("acc", "acc_norm", "task_likelihood")


@dataclass(frozen=True)
class EvalConfig(QuantizationFields):
    """Settings of one evaluation run (``pudding eval``); each field's help text is its documentation.

    An omission set may name sub-layers beside whole blocks (``"3,12.attn"``, see
    :func:`pudding.core.omit.parse_omission`); such a set is kept as its canonical key, e.g. ``(3, "12.attn")``.
    """

    model: str = field(default=DEFAULT_MODEL, metadata={
        "help": "'default' (the embedded SmolLM2), a .gguf file, a model folder or a hub id"})
    tasks: tuple[str, ...] = field(default=("piqa", "arc_easy"), metadata={
        "help": "comma-separated task names (see `pudding tasks`)"})
    omissions: tuple[OmissionSet, ...] | None = field(default=None, metadata={
        "flag": "--omit", "append": True, "type": "omission", "metavar": "BLOCKS",
        "help": "comma-separated 0-based blocks to omit, or 'none' for dense; sub-layers too, e.g. "
                "'3,12.attn,14.mlp' (docs/SUBBLOCK.md); repeat for more rows (default: dense only; with "
                "--routed, no static row)"})
    limit: int | None = field(default=None, metadata={
        "type": "positive_int", "help": "documents per task (a fixed, seeded sample of the split); default: all"})
    split: str = field(default="evaluation", metadata={
        "choices": SPLITS, "help": "evaluation (reported accuracy) or calibration"})
    max_batch_tokens: int = field(default=512, metadata={
        "flag": "--batch-tokens", "type": "positive_int", "help": "padded tokens per forward pass"})
    output_dir: str | None = field(default="runs/eval", metadata={
        "help": "where the result JSON is written"})
    save_samples: bool = field(default=True, metadata={
        "help": "leave out every document's per-choice scores (kept by default, for later re-analysis)"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})
    adapter: str | None = field(default=None, metadata={
        "metavar": "PATH", "help": "LoRA adapters from `pudding heal` (artifact, its adapters/ or one adapter "
                                   "folder): each row runs with its set's adapter, or the shared one "
                                   "(docs/HEALING.md)"})
    routed: str | None = field(default=None, metadata={
        "metavar": "ARTIFACT", "help": "add a row in which each document runs without the set this PuDDing "
                                       "artifact's router picks for it ('default': the shipped one); with "
                                       "--adapter, each set with its adapter"})

    def __post_init__(self):
        super().__post_init__()
        if self.adapter is not None and self.quantize != "none":
            raise ConfigError("healing adapters (--adapter) do not run on a quantized model; drop one of --adapter "
                              "and --quantize")
        tasks = self.tasks.split(",") if isinstance(self.tasks, str) else list(self.tasks)
        tasks = [t.strip() for t in tasks if t and t.strip()]
        if not tasks:
            raise ConfigError("no tasks given: pass at least one, e.g. --tasks piqa,arc_easy")
        for name in tasks:
            get_task(name)  # raises UnknownNameError listing the known tasks
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(tasks)))
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"limit must be a positive integer or None, got {self.limit!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.max_batch_tokens < 1:
            raise ConfigError("max_batch_tokens must be positive")
        if self.omissions is None:
            object.__setattr__(self, "omissions", ((),) if self.routed is None else ())
        if not self.omissions and self.routed is None:
            raise ConfigError("omissions must list at least one set; () is the dense model")
        # The upper bound needs the model's block count, so evaluate() checks it; here all the rest.
        object.__setattr__(self, "omissions", tuple(omission_key(o, None) for o in self.omissions))


def omission_label(omitted: OmissionSet) -> str:
    """``"dense"`` or ``"omit 20,21"``: the row name of an omission set in tables."""
    return "dense" if not omitted else "omit " + ",".join(map(str, omitted))


def score_docs(scorer: LikelihoodScorer, docs: list[MCDoc], progress: bool | str = False) -> list[DocScores]:
    """Score every choice of every document in one batched pass; results follow ``docs``."""
    requests = [r for doc in docs for r in doc_requests(doc)]
    return scores_by_doc(docs, scorer.score(requests, progress=progress))


def _task_summary(task_name: str, scored: list[DocScores], seconds: float | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"primary_metric": get_task(task_name).metric,
                               "seconds": None if seconds is None else round(seconds, 2)}
    for metric in REPORTED_METRICS:
        summary[metric] = dataclasses.asdict(aggregate(scored, metric))
    return summary


def _scored_part(parts: EvalParts, name: str, scorer, docs: list[MCDoc], desc: bool | str
                 ) -> tuple[list[DocScores], float | None]:
    """``docs`` scored, from the saved part ``name`` if an earlier run of the same identity finished it."""
    saved = parts.load(name, [d.doc_id for d in docs])
    if saved is not None:
        return saved
    start = time.perf_counter()
    scored = score_docs(scorer, docs, progress=desc)
    seconds = time.perf_counter() - start
    parts.save(name, scored, seconds)
    return scored, seconds


def _evaluate_omission(config: EvalConfig, scorer, docs: dict[str, list[MCDoc]], omitted: OmissionSet,
                       adapters=None, parts: EvalParts | None = None, row: int = 0) -> dict:
    parts = parts or EvalParts(None, {})
    run: dict[str, Any] = {"omitted": list(omitted), "label": omission_label(omitted), "tasks": {}, "samples": {}}
    healing = nullcontext() if adapters is None else adapters.activate(omitted)  # entered before omit_blocks
    if adapters is not None:
        run["adapter"] = adapters.adapter_for(omitted)
        run["label"] += f" + lora {run['adapter']}" if run["adapter"] else ""
    with healing, omit_blocks(scorer.model, omitted):
        for task_name, task_docs in docs.items():
            desc = f"{omission_label(omitted)} {task_name}" if config.progress else False
            scored, seconds = _scored_part(parts, f"row-{row}-{task_name}", scorer, task_docs, desc)
            run["tasks"][task_name] = _task_summary(task_name, scored, seconds)
            if config.save_samples:
                run["samples"][task_name] = [d.to_json() for d in scored]
    return run


def _evaluate_routed(config: EvalConfig, scorer, docs: dict[str, list[MCDoc]], pudding, adapters=None,
                     parts: EvalParts | None = None) -> dict:
    """One row: every document scored without the set the artifact's router picks for it (from the document's
    router text, as a server would route it). Documents that share a set are scored together."""
    parts = parts or EvalParts(None, {})
    flat = [doc for task_docs in docs.values() for doc in task_docs]
    routes = pudding.route([doc.router_text for doc in flat])
    by_set: dict[OmissionSet, list[int]] = {}
    for i, route in enumerate(routes):
        by_set.setdefault(route.blocks, []).append(i)
    scored: list[DocScores | None] = [None] * len(flat)
    seconds = 0.0
    for blocks, indices in by_set.items():
        healing = nullcontext() if adapters is None else adapters.activate(blocks)
        with healing, omit_blocks(scorer.model, blocks):
            desc = f"routed: {omission_label(blocks)}" if config.progress else False
            name = "routed-" + ("-".join(map(str, blocks)) or "dense")
            group, group_seconds = _scored_part(parts, name, scorer, [flat[i] for i in indices], desc)
            seconds += group_seconds or 0.0
            for i, doc_scores in zip(indices, group):
                scored[i] = doc_scores
    run: dict[str, Any] = {"omitted": None, "label": f"PuDDing ({config.routed})", "tasks": {}, "samples": {},
                           "routed": {"artifact": config.routed, "k": _pool_k(pudding.pool),
                                      "sets": dict(Counter(route.name for route in routes)),
                                      "seconds": round(seconds, 2)}}
    if adapters is not None:
        run["adapter"] = {omission_label(b): adapters.adapter_for(b) for b in by_set}
        run["label"] += " + lora"
    position = 0
    for task_name, task_docs in docs.items():
        task_scored = scored[position:position + len(task_docs)]
        task_routes = routes[position:position + len(task_docs)]
        position += len(task_docs)
        # one pass over every set: the time is the row's, not a task's
        run["tasks"][task_name] = _task_summary(task_name, task_scored, None)
        if config.save_samples:
            run["samples"][task_name] = [d.to_json() | {"omitted": list(r.blocks), "set": r.name}
                                         for d, r in zip(task_scored, task_routes)]
    return run


def _pool_k(pool) -> float | None:
    """The blocks every set of ``pool`` removes (a sub-layer counts half, :attr:`PoolEntry.k`); None when they
    differ (a depth ladder, or sub-layer sets of one parameter budget)."""
    sizes = {entry.k for entry in pool.sets}
    return sizes.pop() if len(sizes) == 1 else None


def evaluate(config: EvalConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Run ``config`` and return the result dict (also written as JSON when ``config.output_dir`` is set).

    Pass an already loaded ``model`` and ``tokenizer`` to skip loading ``config.model``.
    """
    if (model is None) != (tokenizer is None):
        raise ConfigError("pass both model and tokenizer, or neither (to load config.model)")
    if model is None:
        total = load_config(config.model).num_hidden_layers
    else:
        total = model.config.num_hidden_layers
    for omitted in config.omissions:
        omission_key(omitted, total)  # fail before the slow part
    docs = {name: load_docs(name, config.split, limit=config.limit) for name in config.tasks}
    if model is None:
        model, tokenizer = load_model(config.model, **config.quantization)
    else:
        # the result records config.quantize
        check_quantized(model, config.quantize, config.quantize_head, config.quantize_skip)
    pudding = _load_router(config.routed, model, tokenizer)  # before the adapters wrap the model's layers
    adapters = _load_adapters(model, config.adapter)
    scorer = LikelihoodScorer(model, tokenizer, max_batch_tokens=config.max_batch_tokens)
    parts = EvalParts(config.output_dir, run_identity(config, model, docs))
    result = {
        "config": dataclasses.asdict(config),
        "model": {"spec": config.model, "name": model_name(config.model), "model_type": model.config.model_type,
                  "num_blocks": total},
        "provenance": provenance(),
        "runs": [_evaluate_omission(config, scorer, docs, omitted, adapters, parts, row)
                 for row, omitted in enumerate(config.omissions)],
    }
    if pudding is not None:
        result["runs"].append(_evaluate_routed(config, scorer, docs, pudding, adapters, parts))
    if parts.reused:  # say which parts an earlier, interrupted run scored
        result["resumed_parts"] = parts.reused
    if config.output_dir is not None:
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        path = Path(config.output_dir) / f"eval-{stamp}.json"
        result["path"] = str(atomic_write_json(path, result))
        atomic_write_text(path.with_suffix(".md"), render_markdown(result))
        parts.finish()
    return result


def _load_router(artifact: str | None, model, tokenizer):
    """The PuDDing artifact ``artifact`` on ``model`` (None without one); it refuses a model it was not built for."""
    if artifact is None:
        return None
    from pudding.routing.model import PuddingModel

    return PuddingModel.from_pretrained(artifact, model=model, tokenizer=tokenizer, adapters="none")


def _load_adapters(model, path: str | None):
    """The healing adapters at ``path`` on ``model`` (None without a path); ConfigError if there are none."""
    if path is None:
        return None
    from pudding.healing.adapters import AdapterBank

    adapters = AdapterBank.load(model, path)
    if adapters is None:
        raise ConfigError(f"no healing adapters at {path} (pudding heal writes them to <artifact>/adapters/)")
    return adapters


def render_markdown(result: dict[str, Any]) -> str:
    """A self-describing Markdown page for one result: the table plus the command and provenance behind it."""
    prov = result["provenance"]
    git = prov["git"]
    commit = f"{git['commit']}{' (dirty tree)' if git.get('dirty') else ''}"
    return "\n".join([
        f"# Evaluation of {result['model']['name']}",
        "",
        format_table(result),
        "",
        f"- command: `{' '.join(prov['command'])}`",
        f"- config: `{json.dumps(result['config'])}`",
        f"- git commit: {commit}",
        f"- date: {prov['date']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in prov['versions'].items())}",
        "",
    ])


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table: row, task, metric, value, stderr, N (primary metric first)."""
    lines = ["| model | task | metric | value | stderr | N |", "|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for task_name, summary in run["tasks"].items():
            primary = summary["primary_metric"]
            for metric in (primary, *[m for m in ("acc", "acc_norm") if m != primary]):
                agg = summary[metric]
                lines.append(f"| {run['label']} | {task_name} | {metric} | {agg['value']:.4f} | "
                             f"{agg['stderr']:.4f} | {agg['n']} |")
    return "\n".join(lines)
