"""Rows scored outside a reproduction, set beside its main table document by document.

A `pudding reproduce` folder holds its evaluation documents' scores under every set it scored, and the routers
its PuDDing rows name. Methods that are not a column of those scores (a merged checkpoint, sub-layer sets, a
healed model, a routed model run by ``pudding eval --routed``) are scored by ``pudding eval`` on the same
documents instead. This module reads both and lines them up:

- :class:`TableDocuments`: the table's documents, in its order, and every saved set's per-document correctness;
- :func:`static_cells` and :func:`pudding_cells`: the table's own static and PuDDing rows, recomputed (each must
  equal the table's average, or ConfigError: they would not be the table's rows);
- :class:`ExternalRow` and :func:`external_cells`: one ``pudding eval`` row, checked to hold every document of the
  table with the same gold answers and to remove as many blocks as the table's k (or none: a dense reference).

``benchmarks/baselines_table.py`` (the reviewers' baselines) and ``scripts/heal_table.py`` (healing) build on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pudding.core.errors import ConfigError
from pudding.core.omit import parse_omission
from pudding.core.provenance import read_json
from pudding.core.tasks import get_task
from pudding.evaluation.tables import mean_stderr
from pudding.pool.artifact import CandidatePool
from pudding.routing.labels import Labels
from pudding.routing.model import PuddingModel
from pudding.routing.train import is_correct, routing_data

# table row -> the scoring-pool set names it may be saved under (older runs call SLEB's set "sleb")
SAVED_STATIC = {"dense": ("dense",), "sleb": ("sleb-ppl", "sleb"), "shortened_ppl": ("shortened_ppl",),
                "taylor": ("taylor",), "shortgpt": ("shortgpt",)}
TOLERANCE = 1e-9  # a recomputed row average against the table's: the same documents and sets give the same sum


@dataclass
class TableDocuments:
    """A reproduction's evaluation documents, in its order, with every scoring-pool set's correctness."""

    main: dict
    tasks: list[str]
    doc_ids: list[str]
    golds: list[int]
    texts: list[str]
    correct: list[list[float]]  # document -> scoring-pool column -> 0/1
    set_names: list[str]
    sets: list[tuple]
    num_blocks: int
    baseline_sets: dict[str, tuple]  # static method -> the blocks the table's baselines omit at its k

    @classmethod
    def load(cls, run: Path) -> TableDocuments:
        main = read_json(run / "main.json", f"{run} holds no main.json; pass a `pudding reproduce` output folder")
        labels = Labels.load(_artifact_path(main, "scores/paper-tasks"))
        data = routing_data(labels)
        table = labels.table
        return cls(main, list(table["task"]), list(table["doc_id"]), list(table["gold"]), data.texts,
                   data.correct.tolist(), list(labels.meta["set_names"]), [tuple(s) for s in labels.meta["sets"]],
                   labels.meta["identity"]["model"]["num_blocks"], _baseline_sets(run))

    @property
    def k(self) -> int:
        return self.main["config"]["k"]

    def column(self, row: str) -> int | None:
        """The scores' column of a static row: found by its blocks, since scores shared with another run (a
        depth ladder's) name sets their own way; by name for runs that kept no baselines folder."""
        blocks = () if row == "dense" else self.baseline_sets.get(row)
        if blocks is not None:
            return self.sets.index(blocks) if blocks in self.sets else None
        return next((self.set_names.index(n) for n in SAVED_STATIC[row] if n in self.set_names), None)


def _baseline_sets(run: Path) -> dict[str, tuple]:
    """Each static method's set in the baselines a reproduction used (its folder keeps a copy, at its k)."""
    if not (run / "baselines" / "pool.json").exists():
        return {}
    baselines = CandidatePool.from_pretrained(run / "baselines")
    return {source.method: tuple(entry.blocks) for entry in baselines.sets for source in entry.sources}


def _artifact_path(main: dict, name: str) -> Path:
    """Where the table's artifact ``name`` lives (built by its run or reused from another)."""
    entry = main.get("artifacts", {}).get(name)
    if not isinstance(entry, dict) or not entry:
        raise ConfigError(f"the table records no artifact {name!r}; it predates the artifact record, rerun it")
    path = Path(next(iter(entry.values())))
    if not path.exists():
        raise ConfigError(f"the table's {name} is at {path}, which does not exist here; run from the repository root")
    return path


def check_average(docs: TableDocuments, label: str, values: list[float]) -> None:
    """Refuse a recomputed row whose average is not the table's: it would not be the table's row."""
    expected = docs.main["rows"][label]["average"]
    got = row_summary(docs.tasks, values)["average"]
    if abs(got - expected) > TOLERANCE:
        raise ConfigError(f"row {label!r} recomputes to {got:.6f}, the table says {expected:.6f}; the saved scores "
                          "or routers are not the ones the table was made from")


def static_cells(docs: TableDocuments) -> dict[str, list[float]]:
    """The table's fixed static rows, from the saved scores."""
    cells = {}
    for row in SAVED_STATIC:
        column = docs.column(row)
        if column is not None and row in docs.main["rows"]:
            cells[row] = [c[column] for c in docs.correct]
            check_average(docs, row, cells[row])
    return cells


def pudding_cells(docs: TableDocuments) -> dict[str, list[float]]:
    """The table's single-router PuDDing rows (the paper's router and the best variant), routed again with the
    routers the table records."""
    kinds = docs.main.get("kinds", {})
    index = {blocks: i for i, blocks in enumerate(docs.sets)}
    cells = {}
    for label, kind in kinds.items():
        if kind != "pudding" or not label.startswith(("PuDDing (paper: ", "PuDDing, best variant (")):
            continue
        router = label[label.index("(") + 1:-1].split(": ")[-1]
        pudding = PuddingModel.from_pretrained(_artifact_path(docs.main, f"router {router}"), router_only=True,
                                               adapters="none")
        columns = [index.get(tuple(route.blocks)) for route in pudding.route(docs.texts)]
        if None in columns:
            raise ConfigError(f"router {router} picks a set the saved scores do not hold")
        cells[label] = [docs.correct[i][c] for i, c in enumerate(columns)]
        check_average(docs, label, cells[label])
    if not cells:
        raise ConfigError("the table has no single-router PuDDing row to compare with")
    return cells


@dataclass(frozen=True)
class ExternalRow:
    """One `pudding eval` row: its name in the table and where its result is."""

    name: str
    path: Path
    label: str | None

    @classmethod
    def parse(cls, spec: str) -> ExternalRow:
        name, sep, where = spec.partition("=")
        if not sep or not name.strip() or not where.strip():
            raise ConfigError(f"--row takes NAME=EVAL_JSON_OR_FOLDER[#ROW_LABEL], got {spec!r}")
        path, _, label = where.partition("#")
        return cls(name.strip(), Path(path), label or None)

    def result(self) -> dict:
        path = self.path
        if path.is_dir():
            found = sorted(path.glob("eval-*.json"))
            if len(found) != 1:
                raise ConfigError(f"{path} holds {len(found)} eval-*.json files; name the one for row {self.name!r}")
            path = found[0]
        return read_json(path, f"{path} (row {self.name!r}) is missing") | {"path": str(path)}

    def run(self, result: dict) -> dict:
        runs = result.get("runs") or []
        if self.label is None and len(runs) == 1:
            return runs[0]
        chosen = [r for r in runs if r.get("label") == self.label]
        if len(chosen) != 1:
            raise ConfigError(f"{result['path']} has rows {[r.get('label') for r in runs]}; pick one with "
                              f"{self.name}=PATH#LABEL")
        return chosen[0]


def blocks_removed(result: dict, run: dict, base_blocks: int) -> float:
    """Blocks the row removes: the checkpoint's missing blocks, plus its omitted whole blocks, plus half a block
    per omitted sub-layer (FinerCut counts attention and MLP sub-layers alike, two to a block). A routed row
    (``pudding eval --routed``) removes its artifact's k from every document."""
    if run.get("routed") is not None:
        k = run["routed"].get("k")
        if k is None:
            raise ConfigError(f"the routed row of {result.get('path', 'an eval result')} records no k: its "
                              "artifact's sets differ in size (a depth ladder, or sub-layer sets)")
        return base_blocks - result["model"]["num_blocks"] + k
    omission = parse_omission(run.get("omitted") or [], result["model"]["num_blocks"])
    return base_blocks - result["model"]["num_blocks"] + len(omission.blocks) + len(omission.sublayers) / 2


def external_cells(docs: TableDocuments, row: ExternalRow) -> tuple[list[float], dict]:
    """Per table document, whether the row answers it; and where the row came from."""
    result = row.result()
    run = row.run(result)
    if result.get("config", {}).get("split", "evaluation") != "evaluation":
        raise ConfigError(f"{result['path']} scored the {result['config']['split']} split, not evaluation")
    removed = blocks_removed(result, run, docs.num_blocks)
    if removed not in (0, docs.k):  # 0: a dense reference
        raise ConfigError(f"row {row.name!r} removes {removed:g} blocks, the table is at k={docs.k}")
    samples = {(task, s["doc_id"]): s for task, scored in run.get("samples", {}).items() for s in scored}
    missing = [(t, d) for t, d in zip(docs.tasks, docs.doc_ids) if (t, d) not in samples]
    if missing:
        raise ConfigError(f"{result['path']} lacks {len(missing)} of the table's {len(docs.doc_ids)} documents "
                          f"(first: {missing[0][0]} {missing[0][1]}); evaluate those tasks with at least the table's "
                          "--limit, and keep the samples")
    cells = []
    for task, doc_id, gold in zip(docs.tasks, docs.doc_ids, docs.golds):
        sample = samples[(task, doc_id)]
        if sample["gold"] != gold:
            raise ConfigError(f"{task} {doc_id} has gold {sample['gold']} in {result['path']}, {gold} in the table")
        cells.append(is_correct(sample["logprobs"], sample["n_chars"], gold, get_task(task).metric))
    return cells, {"eval": result["path"], "row": run.get("label"), "model": result["model"]["spec"],
                   "blocks_removed": removed, "eval_provenance": result.get("provenance"),
                   "compressed": compress_summary(result["model"]["spec"], result["path"])}


def compress_summary(spec: str, eval_path: str) -> dict | None:
    """What `pudding compress` recorded about a checkpoint (method, k, calibration, result), if it made it: from
    the checkpoint folder, or from the folder that holds the eval folder (results keep the record, not the
    weights)."""
    candidates = [Path(spec) / "compress.json", Path(eval_path).parent.parent / "compress.json"]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return None
    record = json.loads(path.read_text())
    return {"file": str(path), **{key: record.get(key) for key in ("method", "k", "blocks", "config", "result",
                                                                   "training", "provenance")}}


def row_summary(tasks: list[str], values: list[float]) -> dict:
    """Per task mean and standard error, and their unweighted average (the tables' rule)."""
    per_task = {t: mean_stderr([v for v, task in zip(values, tasks) if task == t]) for t in dict.fromkeys(tasks)}
    return {"tasks": per_task, "average": sum(c["value"] for c in per_task.values()) / len(per_task)}


def difference_cell(difference: dict | None) -> str:
    """A paired difference as a table cell, ``+0.013 [-0.006, +0.031]`` (empty where there is none)."""
    if difference is None:
        return ""
    low, high = difference["ci95"]
    return f"{difference['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
