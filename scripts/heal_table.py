"""The healing table: healed and unhealed rows, routed PuDDing rows, and paired differences with 95% intervals.

Reads the JSONs of ``pudding eval`` runs over the same documents (``--limit`` and tasks equal), each run
with or without ``--adapter`` (see docs/HEALING.md), and writes one JSON and a Markdown table:

- every evaluated row (dense, each set, each with its adapter or none), by its label;
- ``PuDDing`` rows: each document scored under the set the artifact's router chooses for it, read from
  one eval JSON that holds every pool set (unhealed, per-set adapters, or the shared adapter);
- averages over every task and without the tasks the healing data may favour (``--favoured``, default
  boolq: BoolQ's passages are the offline healing text);
- paired per-document differences of each PuDDing row minus every other row, with normal 95% intervals.

    .venv/bin/python scripts/heal_table.py --artifact ART --routed unhealed=runs/eval/a/eval-*.json \\
        --routed per-set=runs/eval/b/eval-*.json --routed shared=runs/eval/c/eval-*.json \\
        --rows runs/eval/a/eval-*.json runs/eval/d/eval-*.json --out results/smollm2/healing
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pudding.core.metrics import first_argmax
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance
from pudding.core.tasks import get_task, load_docs
from pudding.evaluation.tables import mean_stderr, paired_differences
from pudding.routing.model import PuddingModel


def correct(sample: dict, metric: str) -> float:
    """1.0 if the document's gold choice wins under the task's metric (acc or acc_norm), from its saved scores."""
    values = sample["logprobs"] if metric == "acc" else [lp / n for lp, n in zip(sample["logprobs"],
                                                                                 sample["n_chars"])]
    return float(first_argmax(values) == sample["gold"])


def run_columns(result: dict) -> dict[str, dict[tuple, float]]:
    """Per run label: {(task, doc_id): correct}."""
    columns = {}
    for run in result["runs"]:
        cells = {}
        for task, samples in run["samples"].items():
            metric = get_task(task).metric
            cells.update({(task, s["doc_id"]): correct(s, metric) for s in samples})
        columns[run["label"]] = cells
    return columns


def routed_column(result: dict, routes: dict[tuple, tuple]) -> dict[tuple, float]:
    """Each document's correctness under its routed set, from the run of ``result`` that omitted that set."""
    by_blocks = {tuple(run["omitted"]): run for run in result["runs"]}
    missing = sorted({b for b in routes.values() if b not in by_blocks})
    if missing:
        raise SystemExit(f"{result.get('path', 'an eval JSON')} has no run for the routed sets {missing}")
    cells = {}
    for (task, doc_id), blocks in routes.items():
        sample = next(s for s in by_blocks[blocks]["samples"][task] if s["doc_id"] == doc_id)
        cells[(task, doc_id)] = correct(sample, get_task(task).metric)
    return cells


def route_documents(artifact: str, tasks: list[str], limit: int) -> dict[tuple, tuple]:
    """The set the artifact's router picks for every evaluated document (by its router text)."""
    pudding = PuddingModel.from_pretrained(artifact, router_only=True, adapters="none")
    docs = [d for t in tasks for d in load_docs(t, "evaluation", limit=limit)]
    routes = pudding.route([d.router_text for d in docs])
    return {(d.task, d.doc_id): tuple(r.blocks) for d, r in zip(docs, routes)}


def table(columns: dict[str, dict[tuple, float]], keys: list[tuple], tasks: list[str], favoured: set[str]) -> dict:
    rows = {}
    for name, cells in columns.items():
        per_task = {t: mean_stderr([cells[k] for k in keys if k[0] == t]) for t in tasks}
        others = [t for t in tasks if t not in favoured]
        rows[name] = {"tasks": per_task, "average": sum(c["value"] for c in per_task.values()) / len(tasks),
                      "average_without_favoured": sum(per_task[t]["value"] for t in others) / max(1, len(others))}
    return rows


def render(rows: dict, differences: dict, tasks: list[str], favoured: set[str]) -> str:
    head = ["row", *tasks, "average", f"average without {','.join(sorted(favoured)) or '-'}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [f"{row['tasks'][t]['value']:.3f}" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{row['average']:.3f}** | "
                     f"{row['average_without_favoured']:.3f} |")
    for ours, against in differences.items():
        lines += ["", f"Paired differences, {ours} minus each row (per document, 95% interval):", ""]
        lines += [f"- {other}: {d['difference']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (N={d['n']})"
                  for other, d in against.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", default="default", help="the PuDDing artifact whose router routes")
    parser.add_argument("--routed", action="append", default=[], metavar="NAME=EVAL_JSON",
                        help="an eval JSON holding every pool set; adds the row 'PuDDing NAME'")
    parser.add_argument("--rows", nargs="*", default=[], help="eval JSONs whose every run is a row")
    parser.add_argument("--favoured", default="boolq", help="tasks the healing data may favour (comma-separated)")
    parser.add_argument("--out", required=True, help="folder for healing-table.json and .md")
    args = parser.parse_args()
    results = {path: json.loads(Path(path).read_text()) for path in
               [*args.rows, *(spec.split("=", 1)[1] for spec in args.routed)]}
    first = next(iter(results.values()))
    tasks, limit = list(first["config"]["tasks"]), first["config"]["limit"]
    if any(list(r["config"]["tasks"]) != tasks or r["config"]["limit"] != limit for r in results.values()):
        raise SystemExit("every eval JSON must cover the same tasks with the same --limit")
    columns: dict[str, dict[tuple, float]] = {}
    for path in args.rows:
        columns.update(run_columns(results[path]))
    routes = route_documents(args.artifact, tasks, limit)
    for spec in args.routed:
        name, path = spec.split("=", 1)
        columns[f"PuDDing {name}"] = routed_column(results[path], routes)
    keys = list(routes)
    favoured = {t for t in args.favoured.split(",") if t}
    rows = table(columns, keys, tasks, favoured)
    ordered = {name: [columns[name][k] for k in keys] for name in columns}
    differences = {ours: paired_differences(ordered, ours, [o for o in ordered if o != ours])
                   for ours in ordered if ours.startswith("PuDDing ")}
    out = Path(args.out)
    atomic_write_json(out / "healing-table.json", {"rows": rows, "paired_differences": differences,
                                                   "favoured": sorted(favoured), "inputs": sorted(results),
                                                   "provenance": provenance()})
    atomic_write_text(out / "healing-table.md", render(rows, differences, tasks, favoured))
    print(render(rows, differences, tasks, favoured))


if __name__ == "__main__":
    main()
