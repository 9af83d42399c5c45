#!/usr/bin/env bash
# Which label target should the adaptive-depth router predict? Chosen on calibration prompts, never on the curve
# of evaluation documents (docs/ADAPTIVE.md, "A target that follows accuracy"):
# 1. a second ladder router on the same labels, predicting choice-prob (the gold's probability among the choices)
#    instead of TL; the labels hold every choice's log-likelihood, so nothing is scored again;
# 2. each router's adaptive curve on the 259 calibration prompts both held out from training (the split is by
#    question text, so they share it), with the static rows mixed to the same mean k;
# 3. the rule, fixed before step 2 ran: the target whose curve is higher against the mixed static rows (mean
#    paired difference over its points and over SLEB, Shortened-LLaMA PPL and ShortGPT); TL, the paper's, on a tie;
# 4. the chosen router's curve on the main table's 2,400 evaluation documents.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-.venv/bin/pudding}
A=${A:-results/smollm2/adaptive}
S=$A/target-selection
BASELINES=${BASELINES:-results/smollm2/baselines-128}  # the ladder's baselines (baselines-k9 for a k=9 ladder)
# trained again each run (a minute, seeded): the ladder may have grown since
$P train-router --labels $A/labels --pool $A/ladder --router embed-mlp --loss mse --target choice-prob \
    --out $A/router-choice-prob --no-progress
for target in tl choice-prob; do
    artifact=$A/router-$target; [ $target = tl ] && artifact=$A/router
    .venv/bin/python benchmarks/adaptive_curve.py --artifact $artifact --scores $A/labels \
        --baselines $BASELINES --held-out --out $S/$target
done
CHOSEN=$(.venv/bin/python - "$S" <<'PY'
import json, sys
margin = {}
for target in ("tl", "choice-prob"):
    rows = json.load(open(f"{sys.argv[1]}/{target}/adaptive-curve.json"))["curve"]["versus_mixture"]
    static = [m["difference"] for m in rows if m["row"] in ("sleb", "shortened_ppl", "shortgpt") and m["mean_k"] > 0]
    margin[target] = sum(static) / len(static)
chosen = "choice-prob" if margin["choice-prob"] > margin["tl"] else "tl"
json.dump({"margin_over_mixed_static_rows": margin, "chosen": chosen}, open(f"{sys.argv[1]}/choice.json", "w"),
          indent=1)
print(chosen)
PY
)
echo "chosen on held-out calibration prompts: $CHOSEN ($S/choice.json)"
if [ "$CHOSEN" = choice-prob ]; then
    .venv/bin/python benchmarks/adaptive_curve.py --artifact $A/router-choice-prob --scores $A/scores \
        --baselines $BASELINES --out $A/choice-prob
fi
