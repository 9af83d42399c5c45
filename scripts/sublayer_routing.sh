#!/usr/bin/env bash
# Routing over sub-layer sets against whole-block sets at a matched budget (issue 19, docs/SUBBLOCK.md):
# 1. the sub-layer TL search per paper task at k=3, on the small budget's calibration documents (16 per task, the
#    ones results/smollm2/small/k3/pool was searched on); checkpoints are committed in
#    results/smollm2/pool-sublayer-run, so a rerun (in any session) resumes them;
# 2. benchmarks/sublayer_routing.py: every set scored on 64 calibration prompts and 400 evaluation documents
#    per task (the medium table's documents), the paper's router over each pool (5 seeds), the table.
#    Its scores and routers are kept in results/smollm2/sublayer-routing-run (committed: a later session resumes).
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}
RUN=results/smollm2/pool-sublayer-run
POOL=results/smollm2/sublayer-routing/pool-sublayer-k3
# cheapest task first, so that an interrupted run leaves the most finished searches
for T in winogrande arc_challenge hellaswag arc_easy piqa boolq; do
    $P candidates --model default --granularity sublayer --k 3 --samples 16 --objectives tl --tasks $T \
        --run-dir $RUN --out "${WORK:-runs/sublayer-routing}/search-$T" --no-progress
done
$P candidates --model default --granularity sublayer --k 3 --samples 16 --objectives tl \
    --tasks arc_easy,arc_challenge,piqa,winogrande,hellaswag,boolq --run-dir $RUN --out $POOL --no-progress
# The dense scores of the same 2,400 documents are the medium run's (same documents, split, length and shards:
# pudding label checks the identity file and refuses a mismatch); each set's scores are a file of their own.
SRC=results/smollm2/medium-run/smollm2/medium/k6/scores-paper-tasks
DST=results/smollm2/sublayer-routing-run/shards-evaluation
if [ ! -e $DST ] && [ -f $SRC/identity.json ]; then
    mkdir -p $DST.tmp && cp $SRC/identity.json $DST.tmp/
    for s in $SRC/shard-*; do mkdir -p $DST.tmp/${s##*/} && cp $s/docs.parquet $s/set-dense.parquet $DST.tmp/${s##*/}/; done
    mv $DST.tmp $DST
fi
.venv/bin/python benchmarks/sublayer_routing.py --block-pool results/smollm2/small/k3/pool --sublayer-pool $POOL \
    --baselines results/smollm2/small/k3/baselines --finercut results/smollm2/compress/finercut-k3 --k 3 \
    --eval-samples 400 --run-dir results/smollm2/sublayer-routing-run --out results/smollm2/sublayer-routing \
    --no-progress
