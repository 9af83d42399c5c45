#!/usr/bin/env bash
# The medium-budget reproduction at k=3: the same documents, searches and baselines as the k=6 one
# (scripts/reproduce_medium.sh), each cut to its first 3 removals (a greedy search's first j removals are the
# j-block search; a one-shot ranking's top j its j-block set). Nothing is searched again.
# Most scores exist already: the adaptive-depth run (scripts/adaptive_depth.sh) scored every k=3 set on the same
# 1,200 calibration prompts and 2,400 evaluation documents, and the k=6 run scored dense on the unseen tasks. Their
# shards are hard-linked into this run's folders (the writers replace files atomically, so the originals never
# change), so only the k=3 sets on the unseen tasks' documents are scored here; the run resumes like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}
R=results/smollm2/medium-run/smollm2/medium
A=results/smollm2/adaptive
link() {  # link() SOURCE TARGET: TARGET becomes a copy of SOURCE made of hard links, once
    [ -e "$2" ] || { cp -al "$1" "$2.tmp" && mv "$2.tmp" "$2"; }
}
mkdir -p $R/k3
link $A/labels-run $R/k3/labels
link $A/scores-run $R/k3/scores-paper-tasks
link $R/k6/scores-unseen-tasks $R/k3/scores-unseen-tasks
$P reproduce --model default --k 3 --budget medium --reuse results/smollm2 --run-dir results/smollm2/medium-run \
    --no-progress
# The table's rows again with paired differences without BoolQ too (dense SmolLM2 answers BoolQ below the
# majority class, so much of any pruned row's spread is there): without-boolq.{json,md}, -paired.png
.venv/bin/python scripts/heal_table.py --run results/smollm2/medium/k3 --name without-boolq --favoured boolq \
    --out results/smollm2/medium/k3
