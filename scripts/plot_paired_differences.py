"""Draw a saved reproduction's paired-differences figure from its ``main.json`` (no model, no scoring).

``pudding reproduce`` draws ``paired-differences.png`` itself; this redraws it for a run made before it did, next
to the table, with a JSON of what it drew and its provenance:

    .venv/bin/python scripts/plot_paired_differences.py results/smollm2/medium/k6/main.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pudding.core.provenance import atomic_write_json, provenance
from pudding.evaluation.report import plot_paired_differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("main_json", type=Path)
    args = parser.parse_args()
    table = json.loads(args.main_json.read_text())
    drawn = plot_paired_differences(table, args.main_json.with_name("paired-differences.png"))
    atomic_write_json(args.main_json.with_name("paired-differences.json"),
                      {"source": str(args.main_json), "table_provenance": table.get("provenance"), "drawn": drawn,
                       "provenance": provenance()})
    print(f"wrote {args.main_json.with_name('paired-differences.png')}")


if __name__ == "__main__":
    main()
