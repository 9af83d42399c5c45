#!/usr/bin/env bash
# The reviewers' baselines (issue 19) as rows of the committed tables: LaCo (the paper's merge rule and the
# released code's), LLM-Streamline with and without its trained block, and FinerCut, at k=6 and k=3 beside the
# small tables and at k=6 beside the medium table. Resumable: a step whose output exists is skipped.
#
# - Calibration: 16 BoolQ passages (the small budget's), for both tables. LLM-Streamline also ran on 128 (the
#   medium baselines'): it picks the same run and trains the same block, byte for byte. LaCo's sweeps cost
#   ~20x a Streamline search at 128 passages on this CPU, and the paper calibrates LaCo on five sentences.
# - Checkpoints (0.4 GB each) go to $WORK, outside git; the records go to results/smollm2/compress:
#   compress.json, LLM-Streamline's training curves, FinerCut's sets and search checkpoint, every eval JSON.
# - Evaluation: the tables' own documents (the first 30 / 400 per task of the seeded evaluation order).
# - Tables: benchmarks/baselines_table.py matches each row to the table's documents, recomputes the table's own
#   rows (and refuses if they differ) and writes reviewer-baselines.{json,md} plus the paired-differences plot
#   beside each table, and redraws the budget's accuracy-vs-k plot with the new rows.
# About 5 hours on 2 CPU cores (FinerCut's k=6 search is most of it); see docs/MERGE_BASELINES.md.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}  # P=echo prints what a run would do
WORK=${WORK:-runs/reviewer-baselines}
OUT=results/smollm2/compress
TASKS=arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq
declare -A LIMIT=([small]=30 [medium]=400)

evaluated() {  # name, then tables: true when every table's eval of that checkpoint is in results already
    local name=$1 table; shift
    for table in "$@"; do ls "$OUT/$name/eval-$table"/eval-*.json >/dev/null 2>&1 || return 1; done
}

compress() {  # name, then pudding compress flags; skipped once its record is kept and every eval of it is done
    local name=$1; shift
    local tables=(small); [[ $name == *-k6 ]] && tables+=(medium)
    if [ -f "$OUT/$name/compress.json" ] && evaluated "$name" "${tables[@]}"; then return; fi
    [ -f "$WORK/$name/compress.json" ] || $P compress "$@" --model default --samples 16 --out "$WORK/$name" --no-progress
    mkdir -p "$OUT/$name"
    cp "$WORK/$name/compress.json" "$OUT/$name/"
    if [ -f "$WORK/$name/training.json" ]; then cp "$WORK/$name/training.json" "$WORK/$name/training.png" "$OUT/$name/"; fi
}

evaluate() {  # name, table (small or medium), then --model or --omit flags
    local name=$1 table=$2; shift 2
    evaluated "$name" "$table" ||
        $P eval "$@" --tasks $TASKS --limit "${LIMIT[$table]}" --output-dir "$OUT/$name/eval-$table" --no-progress
}

for K in 6 3; do
    compress "laco-k$K" --method laco --k $K
    compress "laco-released-k$K" --method laco --rule released_code --k $K
    compress "streamline-k$K" --method streamline --k $K
    compress "streamline-notrain-k$K" --method streamline --no-train --k $K
    for M in laco laco-released streamline streamline-notrain; do
        evaluate "$M-k$K" small --model "$WORK/$M-k$K"
    done
done
for M in laco laco-released streamline streamline-notrain; do
    evaluate "$M-k6" medium --model "$WORK/$M-k6"
done

# FinerCut: 2k sub-layers by Jensen-Shannon divergence; k=3 reads its first 6 steps from the k=6 checkpoint
for K in 6 3; do
    [ -f "$OUT/finercut-k$K/subblock_sets.json" ] ||
        $P baselines --model default --methods finercut --k $K --samples 16 --run-dir "$OUT/finercut-run" \
            --out "$OUT/finercut-k$K" --no-progress
done
omit() { .venv/bin/python -c "import json, sys; print(json.load(open(sys.argv[1]))['sets'][0]['omit'])" "$1"; }
evaluate finercut-k6 small --model default --omit "$(omit $OUT/finercut-k6/subblock_sets.json)"
evaluate finercut-k3 small --model default --omit "$(omit $OUT/finercut-k3/subblock_sets.json)"
evaluate finercut-k6 medium --model default --omit "$(omit $OUT/finercut-k6/subblock_sets.json)"

table() {  # run folder, table (small or medium), k
    .venv/bin/python benchmarks/baselines_table.py --run "$1" \
        --row "LaCo=$OUT/laco-k$3/eval-$2" --row "LaCo (released code's rule)=$OUT/laco-released-k$3/eval-$2" \
        --row "LLM-Streamline=$OUT/streamline-k$3/eval-$2" \
        --row "LLM-Streamline, no training=$OUT/streamline-notrain-k$3/eval-$2" \
        --row "FinerCut=$OUT/finercut-k$3/eval-$2"
}
table results/smollm2/small/k6 small 6
table results/smollm2/small/k3 small 3
table results/smollm2/medium-choice-prob/k6 medium 6
