#!/usr/bin/env bash
# Healing at k=6 (K=3: at k=3) on the main table's 2,400 evaluation documents (issue 18, docs/HEALING.md):
# LoRA adapters (PEFT) for the paper's PuDDing (one per pool set, and one shared by every route) and for SLEB and
# Shortened-LLaMA PPL, same data and steps; each healed model scored by `pudding eval` on the medium table's
# documents; the table's unhealed rows reused, not scored again (scripts/heal_table.py checks them).
# Every stage resumes: a finished adapter is kept, an unfinished one resumes from its checkpoint in $RUN, and a
# scored row is not scored again. $RUN is under results/ so that a later session resumes from committed files:
# commit the checkpoint of the adapter still training; a finished adapter's checkpoint is not needed again.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}
K=${K:-6}                          # the table's k: K=3 heals the k=3 table (scripts/reproduce_medium_k3.sh)
T=results/smollm2/medium/k$K       # the main table: its documents, its unhealed rows, its artifacts
SUFFIX=$([ "$K" = 6 ] || echo "-k$K")
H=${H:-results/smollm2/healing$SUFFIX}        # adapters, healed scores, the table
RUN=${RUN:-results/smollm2/healing$SUFFIX-run}  # training checkpoints
ART=$H/pudding                     # a copy of the paper's PuDDing (TL pool, TL labels, embed-mlp MSE router)
TASKS=arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq
STEPS=${STEPS:-60}
LIMIT=${LIMIT:-400}   # documents per task: the table's 400 (smaller only for a smoke run; the table needs all)
mkdir -p $H
[ -e $ART ] || { cp -r $T/routers/embed-mlp-mse $ART.tmp && mv $ART.tmp $ART; }
heal() { $P heal --steps "$STEPS" --no-progress "$@"; }
# 1. adapters: SLEB (set 0) and Shortened-LLaMA PPL (set 1) of the table's baselines, then one per PuDDing set,
#    then one shared by every set and the dense model
heal --pool $T/baselines --out $H/baselines --sets 0,1 --run-dir $RUN/baselines
heal --pool $ART --mode per-set --run-dir $RUN/per-set
heal --pool $ART --mode shared --include-dense --run-dir $RUN/shared
# 2. the healed rows, 400 documents per task (the table's own: the same seeded sample)
score() {
    local out=$1; shift
    if ! ls $out/eval-*.json >/dev/null 2>&1; then
        $P eval --model default --tasks $TASKS --limit $LIMIT --output-dir $out.tmp --no-progress "$@"
        rm -rf $out && mv $out.tmp $out
    fi
}
SLEB=$(.venv/bin/python -c "import json; print(','.join(map(str, json.load(open('$T/baselines/pool.json'))['sets'][0]['blocks'])))")
PPL=$(.venv/bin/python -c "import json; print(','.join(map(str, json.load(open('$T/baselines/pool.json'))['sets'][1]['blocks'])))")
score $H/eval/sleb --omit $SLEB --adapter $H/baselines
score $H/eval/shortened-ppl --omit $PPL --adapter $H/baselines
score $H/eval/per-set --routed $ART --adapter $ART/adapters
score $H/eval/shared --routed $ART --omit none --adapter $ART/adapters/shared
# 3. the table: the unhealed rows are the table's; healed PuDDing minus every other row, and each healed row minus
#    the rest (so healed minus unhealed, per method, and dense with the shared adapter minus dense)
.venv/bin/python scripts/heal_table.py --run $T \
    --row "SLEB + LoRA=$H/eval/sleb" --row "Shortened-LLaMA PPL + LoRA=$H/eval/shortened-ppl" \
    --row "PuDDing + LoRA per set=$H/eval/per-set" \
    --row "PuDDing + LoRA shared=$H/eval/shared#PuDDing ($ART) + lora" \
    --row "dense + LoRA shared=$H/eval/shared#dense + lora shared" \
    --ours "PuDDing + LoRA per set" --ours "PuDDing + LoRA shared" --ours "PuDDing (paper: embed-mlp-mse)" \
    --ours "SLEB + LoRA" --ours "Shortened-LLaMA PPL + LoRA" --ours "dense + LoRA shared" \
    --out $H
