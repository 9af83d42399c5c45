#!/usr/bin/env bash
# The medium-budget reproduction at k=6 (400 evaluation documents per paper task, 100 per unseen task, 200
# calibration prompts per task for the routers, 128 per task for the searches), resumable across sessions:
# every checkpoint lives under results/smollm2/ and is committed as it finishes, so a fresh clone continues
# where the last session stopped instead of starting over. Several hours on 2 CPU cores; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
P=.venv/bin/pudding
# 1. the paper's calibration size: TL searches on 128 documents per task (margin would cost three times this)
$P candidates --model default --k 6 --samples 128 --objectives tl \
    --run-dir results/smollm2/pool-128-run --out results/smollm2/pool-128 --no-progress
# 2. the static baselines on the same 128 calibration documents
$P baselines --model default --k 6 --samples 128 \
    --run-dir results/smollm2/baselines-128-run --out results/smollm2/baselines-128 --no-progress
# 3. calibration labels and evaluation scores under every set, the routers and their variants, the tables;
#    steps 1-2 are found by their identity under results/smollm2 (--reuse) and reused
$P reproduce --model default --k 6 --budget medium --reuse results/smollm2 --run-dir results/smollm2/medium-run \
    --no-progress
# 4. an accuracy-aimed pool: choice-prob searches on 64 calibration documents per task (every choice is scored,
#    not only the gold one); checkpointed per step, committed in the run folder
$P candidates --model default --k 6 --samples 64 --objectives choice-prob \
    --run-dir results/smollm2/choice-prob-64/run --out results/smollm2/choice-prob-64 --no-progress
# 5. the same reproduction with those sets added (--extra-pool): in the same --run-dir only the new sets are
#    scored; the paper's rows are unchanged, the static choices and the widest routing variant gain the sets.
#    Any step here takes --executor ray --ray-actors 2 to use both cores (identical results; the committed
#    step 5 ran so: labels 2,117 s)
$P reproduce --model default --k 6 --budget medium --reuse results/smollm2 --run-dir results/smollm2/medium-run \
    --extra-pool results/smollm2/choice-prob-64 --out results/smollm2/medium-choice-prob/k6 --no-progress
