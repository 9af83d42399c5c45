#!/usr/bin/env bash
# Adaptive depth (issue 17, docs/ADAPTIVE.md section 5): a depth ladder built from the medium reproduction's
# 128-document searches and baselines, labels on its 200 calibration prompts per task, a router that predicts every
# rung's score, and the accuracy-against-mean-k curve on the main table's 2,400 evaluation documents.
#   DEPTHS=0,3,6 bash scripts/adaptive_depth.sh     # no search: k=3 and k=6 are prefixes of the k=6 searches
#   bash scripts/adaptive_depth.sh                  # DEPTHS=0,3,6,9: the searches and SLEB extended to k=9
# Every stage resumes, and every set's scores are a file of their own in the run folders (under results/, so a
# later session resumes from committed files): a deeper ladder reuses every score of a shallower one. The medium
# run's k=6 scores and dense scores are hard links (`cp -al`; the writers replace files atomically, so the
# originals never change), and so are the k=3 block sets the sub-layer routing run already scored on the same
# documents.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}
A=${A:-results/smollm2/adaptive}
M=results/smollm2/medium-run/smollm2/medium/k6
DEPTHS=${DEPTHS:-0,3,6,9}
DEEPEST=${DEPTHS##*,}
mkdir -p $A
# 1. the searches and baselines to the deepest rung (at most k=6: the committed ones as they are)
if [ "$DEEPEST" -le 6 ]; then
    POOL=results/smollm2/pool-128; BASELINES=results/smollm2/baselines-128
else
    [ -e $A/pool-run ] || cp -r results/smollm2/pool-128-run $A/pool-run
    [ -e $A/baselines-run ] || cp -r results/smollm2/baselines-128-run $A/baselines-run
    POOL=$A/pool-k$DEEPEST; BASELINES=$A/baselines-k$DEEPEST
    $P candidates --model default --k $DEEPEST --samples 128 --objectives tl --run-dir $A/pool-run --out $POOL \
        --no-progress
    $P baselines --model default --k $DEEPEST --samples 128 --run-dir $A/baselines-run --out $BASELINES --no-progress
fi
# 2. the ladder: dense, and every search's and baseline's set at each depth
$P ladder --pool $POOL --pool $BASELINES --depths $DEPTHS --out $A/ladder
# 3. labels: the medium run's calibration prompts; its dense and k=6 scores are reused
[ -e $A/labels-run ] || cp -al $M/labels $A/labels-run
$P label --pool $A/ladder --samples 200 --run-dir $A/labels-run --out $A/labels --no-progress
# 4. the router: the medium reproduction's paper configuration (embed-mlp, MSE on the TL target)
$P train-router --labels $A/labels --pool $A/ladder --router embed-mlp --loss mse --target tl --out $A/router \
    --no-progress
# 5. evaluation scores on the main table's documents (400 per paper task)
if [ ! -e $A/scores-run ]; then
    cp -al $M/scores-paper-tasks $A/scores-run.tmp
    for shard in results/smollm2/sublayer-routing-run/shards-evaluation/shard-*; do
        for f in $shard/set-*.parquet; do
            name=${f##*/}
            # whole-block sets only (no sub-layer names): the same documents, split, length and shards
            case $name in *attn*|*mlp*) continue ;; esac
            [ -e $A/scores-run.tmp/${shard##*/}/$name ] || ln $f $A/scores-run.tmp/${shard##*/}/$name
        done
    done
    mv $A/scores-run.tmp $A/scores-run
fi
$P label --pool $A/ladder --split evaluation --samples 400 --run-dir $A/scores-run --out $A/scores --no-progress
# 6. the curve, the paired differences at matched mean k, the plot
.venv/bin/python benchmarks/adaptive_curve.py --artifact $A/router --scores $A/scores --baselines $BASELINES --out $A
