"""Write results/README.md: every committed result, what it is, the command that made it, its commit and date.

The command, commit and date are read from each result's own ``provenance`` block, never typed by hand, so
the index cannot drift from the files. Only the one-line descriptions of the folders live here.

    .venv/bin/python scripts/results_index.py            # rewrites results/README.md
    .venv/bin/python scripts/results_index.py --check    # exit 1 if results/README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from pudding.core.provenance import atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

# What each folder holds, in the order the pipeline makes them; a folder not listed here is shown without one.
FOLDERS = {
    "smollm2-dense": "dense SmolLM2-135M accuracy on the six paper tasks (up to 1000 documents each)",
    "smollm2/importance": "every block's single-removal effect per task (the task-dependence figure)",
    "smollm2/pool-run": "search checkpoints of the shipped pool: 6 tasks x {TL, margin}, 16 documents per task",
    "smollm2/pool": "the shipped candidate pool at k=6 (built from pool-run)",
    "smollm2/pool-128-run": "search checkpoints at the paper's 128 documents per task (TL; the medium budget)",
    "smollm2/choice-prob-arc-easy": ("an ARC-Easy search with the choice-prob objective (64 documents), "
                                    "its set scored on later calibration documents"),
    "smollm2/pool-128": "the TL pool at k=6 searched on 128 documents per task (the medium budget's)",
    "smollm2/baselines-128": "SLEB, Shortened-LLaMA PPL and Taylor+, ShortGPT at k=6 on 128 documents per task",
    "smollm2/medium/k6": "the `medium` reproduction at k=6: labels, calibration headroom, then tables and routers",
    "smollm2/medium/k3": ("the `medium` reproduction at k=3 (scripts/reproduce_medium_k3.sh): the k=6 searches' "
                          "first 3 removals, the adaptive run's labels and scores; tables, routers, the table "
                          "without BoolQ"),
    "smollm2/medium": "accuracy against k across the medium runs",
    "smollm2/choice-prob-64": ("choice-prob searches of the six paper tasks (64 documents each): the accuracy-aimed "
                               "extra pool of the medium run"),
    "smollm2/medium-choice-prob/k6": "the medium reproduction with the choice-prob sets as --extra-pool",
    "smollm2/baselines": "SLEB, Shortened-LLaMA PPL and Taylor+, ShortGPT at k=6",
    "smollm2/labels": "router labels of the shipped artifact: 64 calibration prompts per task under every set",
    "smollm2/small/k6": "the `small` reproduction at k=6: tables, ablations, routers, per-document scores",
    "smollm2/small/k3": "the `small` reproduction at k=3 (pool and baselines are the k=6 searches' first 3 steps)",
    "smollm2/small": "accuracy against k across the small runs",
    "smollm2/quantized-k6": ("dense, SLEB and routed PuDDing at fp32 and int8-smooth on the medium run's 2,400 "
                             "evaluation documents (the seed paper's quantization table)"),
    "smollm2/compress": ("the reviewers' baselines (scripts/reviewer_baselines.sh): LaCo and LLM-Streamline records "
                         "(compress.json, training curves), FinerCut's search, and each row's `pudding eval` on the "
                         "small and medium tables' documents"),
    "smollm2/pool-sublayer-run": ("sub-layer TL search checkpoints at k=3 (at most 3 blocks' worth of parameters), "
                                  "16 documents per task"),
    "smollm2/sublayer-routing": ("routing over sub-layer sets against whole-block sets at k=3, with every static "
                                 "baseline, on the medium table's 2,400 documents"),
    "smollm2/sublayer-routing-run": "its per-set score shards (both splits), scoring pool, pools and routers",
    "smollm2/healing": ("healing at k=6 (scripts/healing.sh): the LoRA adapters of the baselines and of the paper's "
                        "PuDDing with their training curves, the healed rows' scores, and the healing table"),
    "smollm2/healing-k3": ("healing at k=3 (K=3 scripts/healing.sh): the same adapters, rows and table on the k=3 "
                           "reproduction's documents"),
    "smollm2/adaptive": ("adaptive depth (scripts/adaptive_depth.sh, ladder k = 0, 3, 6): the depth ladder, its "
                         "labels and router, the per-set scores of the main table's documents, the curve and the "
                         "speed"),
    "smollm2/adaptive-k9": ("adaptive depth with a k=9 rung (A=results/smollm2/adaptive-k9 DEPTHS=0,3,6,9 "
                            "scripts/adaptive_depth.sh, in progress): the searches and SLEB extended from k=6, and "
                            "the k<=6 ladder's score shards reused as hard links"),
    "smollm2/bench-int8-smooth": "pre-fill and decode of dense, static and routed SmolLM2 with int8-smooth blocks",
    "smollm2/bench": "pre-fill and decode speed of dense, static and routed SmolLM2 (the shipped router)",
    "smollm2/bench-llm-embed": "the same with the llm-embed router",
    "smollm2": "cross-cutting checks: router latency, lm-eval agreement, statistical power of the budgets",
    "gpu": "speed on one H200: Llama-3.1-8B and SmolLM2 shapes (random weights), bf16 and torchao int8/float8",
    "serve": "the server under 32 concurrent clients against a sequential loop (identical answers)",
    "": "scorer micro-benchmarks",
}


def results_with_provenance() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(RESULTS.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        stamp = data.get("provenance") if isinstance(data, dict) else None
        if isinstance(stamp, dict) and stamp.get("command"):
            found.append((path, stamp))
    return found


def _row(path: Path, stamp: dict) -> str:
    git = stamp.get("git") or {}
    commit = (git.get("commit") or "?")[:7] + (" (dirty)" if git.get("dirty") else "")
    command = stamp["command"]
    command = shlex.join(command) if isinstance(command, list) else str(command)
    return f"| `{path.relative_to(RESULTS)}` | `{command}` | {commit} | {str(stamp.get('date', '?'))[:10]} |"


def _folder_of(path: Path) -> str:
    relative = path.relative_to(RESULTS).parent.as_posix()
    relative = "" if relative == "." else relative
    return max((f for f in FOLDERS if relative == f or relative.startswith(f + "/") or f == ""), key=len)


def render() -> str:
    by_folder: dict[str, list[str]] = {}
    for path, stamp in results_with_provenance():
        by_folder.setdefault(_folder_of(path), []).append(_row(path, stamp))
    lines = ["# Results index", "",
             "Generated by `.venv/bin/python scripts/results_index.py` from each file's own `provenance` block",
             "(command, git commit, date); do not edit by hand. \"dirty\" means the work tree had uncommitted",
             "changes when the result was written (typically the result itself). Every file here can be remade",
             "with its command; `scripts/build_default.sh` and `scripts/reproduce_medium.sh` run them in order.",
             "Files without a provenance block (figures, tables rendered from a JSON, checkpoints) sit next to",
             "the JSON they come from.", ""]
    for folder in FOLDERS:
        if folder not in by_folder:
            continue
        lines += [f"## `results/{folder}`" if folder else "## `results/`", "", FOLDERS[folder], "",
                  "| file | command | commit | date |", "|---|---|---|---|", *by_folder[folder], ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if results/README.md is out of date")
    args = parser.parse_args()
    text = render()
    target = RESULTS / "README.md"
    if args.check:
        current = target.read_text() if target.exists() else ""
        if current != text:
            print(f"{target} is out of date: run scripts/results_index.py", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(target, text)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
