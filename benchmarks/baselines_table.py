"""The reviewers' baselines as rows of a finished reproduction's main table, with paired differences.

LaCo and LLM-Streamline change weights, so each is its own checkpoint (`pudding compress`), and FinerCut's sets
name sub-layers (`pudding baselines --methods finercut`); none of them is a column of the reproduction's saved
scores. Each is scored with `pudding eval` on the table's evaluation documents instead, and this script puts
those per-document results next to the table's own rows, matched document by document:

- the static rows (dense, SLEB, Shortened-LLaMA PPL and Taylor+, ShortGPT) come from the saved scores;
- the PuDDing rows come from routing the documents with the very routers the table names (its artifacts); each
  recomputed average must equal the table's, or the run stops, so the rows below are the table's rows;
- each ``--row NAME=EVAL`` is one `pudding eval` result (a JSON, or a folder holding one; ``EVAL#LABEL`` picks
  one of several rows), scored by lm-eval's rule (acc or acc_norm); it must hold every document of the table,
  with the same gold answers, and remove as many blocks as the table's k (a sub-layer counts half a block,
  FinerCut's own count), or none (a dense reference);
- paired per-document differences, each PuDDing row minus every other row, with 95% intervals.

It writes ``reviewer-baselines.json``/``.md``/``-paired.png`` in the run folder, then redraws the budget's
accuracy-against-k plot, which now carries these rows too::

    .venv/bin/python benchmarks/baselines_table.py --run results/smollm2/small/k6 \\
        --row LaCo=results/smollm2/compress/eval/laco-k6-s16 ...
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from pudding.core.errors import ConfigError
from pudding.core.omit import parse_omission
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance, read_json
from pudding.core.tasks import get_task
from pudding.evaluation.report import REVIEWER_BASELINES, plot_accuracy_vs_k, plot_paired_differences
from pudding.evaluation.tables import mean_stderr, paired_differences
from pudding.routing.labels import Labels
from pudding.routing.model import PuddingModel
from pudding.routing.train import is_correct, routing_data

OUTPUT = Path(REVIEWER_BASELINES).stem
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

    @classmethod
    def load(cls, run: Path) -> TableDocuments:
        main = read_json(run / "main.json", f"{run} holds no main.json; pass a `pudding reproduce` output folder")
        labels = Labels.load(_artifact_path(main, "scores/paper-tasks"))
        data = routing_data(labels)
        table = labels.table
        return cls(main, list(table["task"]), list(table["doc_id"]), list(table["gold"]), data.texts,
                   data.correct.tolist(), list(labels.meta["set_names"]), [tuple(s) for s in labels.meta["sets"]],
                   labels.meta["identity"]["model"]["num_blocks"])

    @property
    def k(self) -> int:
        return self.main["config"]["k"]

    def column(self, names: tuple[str, ...]) -> int | None:
        return next((self.set_names.index(n) for n in names if n in self.set_names), None)


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
    got = _row(docs.tasks, values)["average"]
    if abs(got - expected) > TOLERANCE:
        raise ConfigError(f"row {label!r} recomputes to {got:.6f}, the table says {expected:.6f}; the saved scores "
                          "or routers are not the ones the table was made from")


def static_cells(docs: TableDocuments) -> dict[str, list[float]]:
    """The table's fixed static rows, from the saved scores."""
    cells = {}
    for row, names in SAVED_STATIC.items():
        column = docs.column(names)
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
    per omitted sub-layer (FinerCut counts attention and MLP sub-layers alike, two to a block)."""
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
                   "compressed": _compress_summary(result["model"]["spec"], result["path"])}


def _compress_summary(spec: str, eval_path: str) -> dict | None:
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


def measure(run: Path, rows: list[ExternalRow]) -> dict:
    """The table: the run's static and PuDDing rows, the external rows, and PuDDing minus each of them."""
    docs = TableDocuments.load(run)
    cells = static_cells(docs)
    ours = pudding_cells(docs)
    sources = {}
    for row in rows:
        if row.name in cells or row.name in ours:
            raise ConfigError(f"row name {row.name!r} is taken")
        cells[row.name], sources[row.name] = external_cells(docs, row)
    columns = {**cells, **ours}
    table = {name: _row(docs.tasks, values) for name, values in columns.items()}
    return {"k": docs.k, "budget": docs.main["config"]["budget"], "documents": len(docs.doc_ids),
            "tasks": dict.fromkeys(docs.tasks), "rows": table, "kinds": _kinds(cells, ours, sources),
            "paired_differences": {label: paired_differences(columns, label, list(cells)) for label in ours},
            "sources": sources, "table_provenance": docs.main.get("provenance")}


def _kinds(cells: dict, ours: dict, sources: dict) -> dict[str, str]:
    return {**{n: "external" if n in sources else "static" for n in cells}, **dict.fromkeys(ours, "pudding")}


def _row(tasks: list[str], values: list[float]) -> dict:
    per_task = {t: mean_stderr([v for v, task in zip(values, tasks) if task == t]) for t in dict.fromkeys(tasks)}
    return {"tasks": per_task, "average": sum(c["value"] for c in per_task.values()) / len(per_task)}


def render(result: dict) -> str:
    tasks = list(result["tasks"])
    ours = list(result["paired_differences"])
    lines = [f"k={result['k']}, {result['documents']} evaluation documents ({result['budget']} budget)", "",
             "| row | average | " + " | ".join(tasks) + " | " + " | ".join(f"{o} minus this row" for o in ours) + " |",
             "|---|---|" + "---|" * (len(tasks) + len(ours))]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['tasks'][t]['value']:.3f}" for t in tasks)
        diffs = " | ".join(_difference(result["paired_differences"][o].get(name)) for o in ours)
        lines.append(f"| {name} | {row['average']:.3f} | {cells} | {diffs} |")
    return "\n".join(lines) + "\n"


def _difference(d: dict | None) -> str:
    return "" if d is None else f"{d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a `pudding reproduce` output folder (k*/)")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=EVAL[#LABEL]",
                        help="a `pudding eval` result on the table's documents; repeat for more rows")
    args = parser.parse_args()
    rows = [ExternalRow.parse(spec) for spec in args.row]
    result = {"config": {"run": str(args.run), "rows": args.row}, "provenance": provenance(),
              **measure(args.run, rows)}
    atomic_write_json(args.run / f"{OUTPUT}.json", result)
    atomic_write_text(args.run / f"{OUTPUT}.md", render(result))
    plot_paired_differences(result, args.run / f"{OUTPUT}-paired.png")
    plot_accuracy_vs_k(args.run.parent, result["budget"])
    print(render(result))


if __name__ == "__main__":
    main()
