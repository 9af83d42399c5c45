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
from pathlib import Path

from pudding.core.errors import ConfigError
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance
from pudding.evaluation.external import (
    ExternalRow,
    TableDocuments,
    difference_cell,
    external_cells,
    pudding_cells,
    row_summary,
    static_cells,
)
from pudding.evaluation.report import REVIEWER_BASELINES, plot_accuracy_vs_k, plot_paired_differences
from pudding.evaluation.tables import paired_differences

OUTPUT = Path(REVIEWER_BASELINES).stem


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
    table = {name: row_summary(docs.tasks, values) for name, values in columns.items()}
    return {"k": docs.k, "budget": docs.main["config"]["budget"], "documents": len(docs.doc_ids),
            "tasks": dict.fromkeys(docs.tasks), "rows": table, "kinds": _kinds(cells, ours, sources),
            "paired_differences": {label: paired_differences(columns, label, list(cells)) for label in ours},
            "sources": sources, "table_provenance": docs.main.get("provenance")}


def _kinds(cells: dict, ours: dict, sources: dict) -> dict[str, str]:
    return {**{n: "external" if n in sources else "static" for n in cells}, **dict.fromkeys(ours, "pudding")}


def render(result: dict) -> str:
    tasks = list(result["tasks"])
    ours = list(result["paired_differences"])
    lines = [f"k={result['k']}, {result['documents']} evaluation documents ({result['budget']} budget)", "",
             "| row | average | " + " | ".join(tasks) + " | " + " | ".join(f"{o} minus this row" for o in ours) + " |",
             "|---|---|" + "---|" * (len(tasks) + len(ours))]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['tasks'][t]['value']:.3f}" for t in tasks)
        diffs = " | ".join(difference_cell(result["paired_differences"][o].get(name)) for o in ours)
        lines.append(f"| {name} | {row['average']:.3f} | {cells} | {diffs} |")
    return "\n".join(lines) + "\n"


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
    text = render(result)
    atomic_write_text(args.run / f"{OUTPUT}.md", text)
    plot_paired_differences(result, args.run / f"{OUTPUT}-paired.png")
    plot_accuracy_vs_k(args.run.parent, result["budget"])
    print(text)


if __name__ == "__main__":
    main()
