"""Compare the reproduction tables of two result folders, ignoring provenance and timing.

A re-run of ``pudding reproduce`` in a fresh clone should give the committed tables exactly:

    git clone <repo> /tmp/rerun && cd /tmp/rerun && bash scripts/setup.sh
    .venv/bin/pudding reproduce --model default --k 6 --budget small --reuse results/smollm2   # likewise --k 3
    python scripts/compare_results.py /tmp/rerun/results/smollm2 <repo>/results/smollm2

Exits 1 and names the differing keys if any table or router training history differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# when, where, how long, and whether an artifact was reused or built (and from where): not results
VOLATILE = {"provenance", "config", "sources", "seconds", "artifacts"}
PATTERNS = ("k*/*.json", "accuracy-vs-k-*.json", "k*/routers/*/training.json")


def differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if k not in VOLATILE and a.get(k) != b.get(k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rerun", type=Path)
    parser.add_argument("committed", type=Path)
    args = parser.parse_args(argv)
    compared, bad = 0, []
    for pattern in PATTERNS:
        for path in sorted(args.committed.glob(pattern)):
            other = args.rerun / path.relative_to(args.committed)
            if not other.exists():
                bad.append(f"{other}: missing")
                continue
            keys = differing(json.loads(path.read_text()), json.loads(other.read_text()))
            compared += 1
            if keys:
                bad.append(f"{path.relative_to(args.committed)}: {', '.join(keys)}")
    print(f"{compared} files compared, {len(bad)} differ")
    for line in bad:
        print("  " + line)
    return 1 if bad or not compared else 0


if __name__ == "__main__":
    sys.exit(main())
