"""The healing table: healed rows beside a reproduction's main table, with paired differences (docs/HEALING.md).

- The unhealed rows are the reproduction's own: its static rows from its saved scores, its PuDDing rows routed
  again by the routers it names, each recomputed and checked against the table
  (:mod:`pudding.evaluation.external`). Nothing unhealed is scored again.
- Each ``--row NAME=EVAL[#LABEL]`` is one `pudding eval` result on the same documents: a healed static set
  (``--omit SET --adapter A``), the dense model with a shared adapter, or healed PuDDing
  (``--routed ART --adapter ART``, each document without its routed set, with that set's adapter). Each must hold
  every document of the table, with the same gold answers, and remove the table's k (or none).
- Every row named by ``--ours`` (default: every row whose name starts with "PuDDing") gets its paired
  per-document difference against every other row, with a 95% interval.
- Averages and paired differences are given over every task and without the tasks the healing text may favour
  (``--favoured``, default boolq: BoolQ's passages are the offline healing text).

It writes ``healing-table.json``/``.md``/``-paired.png`` (``--name``) in ``--out``::

    .venv/bin/python scripts/heal_table.py --run results/smollm2/medium/k6 \\
        --row "PuDDing per-set=runs/heal-eval/per-set" --row "SLEB + LoRA=runs/heal-eval/sleb" \\
        --out results/smollm2/healing
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
from pudding.evaluation.report import plot_paired_differences
from pudding.evaluation.tables import paired_differences

OUTPUT = "healing-table"
PAIRED = ("paired_differences", "paired_differences_without_favoured")


def measure(run: Path, rows: list[ExternalRow], ours: list[str] | None, favoured: set[str]) -> dict:
    """Every row (the table's unhealed ones, then ``rows``), each ``ours`` row minus every other one."""
    docs = TableDocuments.load(run)
    columns = {**static_cells(docs), **pudding_cells(docs)}
    kinds = dict.fromkeys(columns, "unhealed (the table's)")
    sources = {}
    for row in rows:
        if row.name in columns:
            raise ConfigError(f"row name {row.name!r} is taken")
        columns[row.name], sources[row.name] = external_cells(docs, row)
        kinds[row.name] = "pudding eval"
    ours = [name for name in columns if name.startswith("PuDDing")] if ours is None else ours
    unknown = [name for name in ours if name not in columns]
    if unknown:
        raise ConfigError(f"--ours names rows that do not exist: {unknown}; the rows are {list(columns)}")
    kept = [i for i, task in enumerate(docs.tasks) if task not in favoured]
    columns_kept = {name: [values[i] for i in kept] for name, values in columns.items()}
    table = {}
    for name, values in columns.items():
        table[name] = row_summary(docs.tasks, values)
        table[name]["average_without_favoured"] = (
            row_summary([docs.tasks[i] for i in kept], [values[i] for i in kept])["average"] if kept else None)
    return {"k": docs.k, "budget": docs.main["config"]["budget"], "documents": len(docs.doc_ids),
            "tasks": dict.fromkeys(docs.tasks), "favoured": sorted(favoured), "rows": table, "kinds": kinds,
            "paired_differences": {o: paired_differences(columns, o, [n for n in columns if n != o]) for o in ours},
            # a gain that the healing text could explain shows as a gap between these and the ones above
            "paired_differences_without_favoured": {
                o: paired_differences(columns_kept, o, [n for n in columns if n != o]) if kept else {} for o in ours},
            "sources": sources, "table_provenance": docs.main.get("provenance")}


def render(result: dict) -> str:
    tasks = list(result["tasks"])
    ours = list(result["paired_differences"])
    without = ",".join(result["favoured"]) or "-"
    lines = [f"k={result['k']}, {result['documents']} evaluation documents ({result['budget']} budget)", "",
             f"| row | average | average without {without} | " + " | ".join(tasks) + " | "
             + " | ".join(f"{o} minus this row" for o in ours) + " | "
             + " | ".join(f"{o} minus this row, without {without}" for o in ours) + " |",
             "|---|---|---|" + "---|" * (len(tasks) + 2 * len(ours))]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['tasks'][t]['value']:.3f}" for t in tasks)
        rest = row["average_without_favoured"]
        diffs = " | ".join(difference_cell(result[key][o].get(name)) for key in PAIRED for o in ours)
        lines.append(f"| {name} | {row['average']:.3f} | {'' if rest is None else f'{rest:.3f}'} | {cells} | "
                     f"{diffs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="a `pudding reproduce` output folder (k*/)")
    parser.add_argument("--row", action="append", default=[], metavar="NAME=EVAL[#LABEL]",
                        help="a `pudding eval` result on the table's documents; repeat for more rows")
    parser.add_argument("--ours", action="append", default=None, metavar="NAME",
                        help="a row whose paired differences to every other row are reported; repeat "
                             "(default: every row named PuDDing...)")
    parser.add_argument("--favoured", default="boolq", help="tasks the healing data may favour (comma-separated)")
    parser.add_argument("--out", required=True, type=Path, help="folder for NAME.{json,md} and NAME-paired.png")
    parser.add_argument("--name", default=OUTPUT, help="the output files' stem (another for a table with no healed "
                                                         "rows, e.g. the reproduction's rows without --favoured)")
    args = parser.parse_args(argv)
    rows = [ExternalRow.parse(spec) for spec in args.row]
    favoured = {t.strip() for t in args.favoured.split(",") if t.strip()}
    result = {"config": {"run": str(args.run), "rows": args.row, "ours": args.ours, "favoured": sorted(favoured)},
              "provenance": provenance(), **measure(args.run, rows, args.ours, favoured)}
    atomic_write_json(args.out / f"{args.name}.json", result)
    text = render(result)
    atomic_write_text(args.out / f"{args.name}.md", text)
    plot_paired_differences(result, args.out / f"{args.name}-paired.png", title="each named row minus every other row")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
