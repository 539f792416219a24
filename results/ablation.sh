#!/usr/bin/env bash
# What stops EMMET's collapse at batch 1,000 on smollm2-135m (results/README.md): the
# same runs with a larger ridge ρ = mom2_update_weight · emmet_lambda (preset: 1 · 0.1),
# at batch 1,000 and, to see what the ridge costs where EMMET did not collapse, at 64 and 256.
# The v* come from the value cache that results/commands.sh filled, so each run is the
# keys, the solve and the scoring only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/counterfact/counterfact-edit.json}
EMMET=${EMMET:-.venv/bin/emmet}
OUT=results/smollm2-135m/ablation
run() {  # batch-size lambda
  local dir="$OUT/emmet-b$1-lambda$2"
  [ -f "$dir/summary.json" ] && { echo "have $dir"; return; }
  "$EMMET" eval --model smollm2-135m --data "$DATA" --n 1000 --generation-every 10 --seed 0 \
    --algo emmet --batch-size "$1" --set emmet_lambda="$2" --out "$dir"
}
for lam in 100 1000; do run 1000 "$lam"; done
for b in 256 64; do run "$b" 1000; done

# ROME's fluency at two clamps (results/README.md): the first 50 records with GE on every
# record, at the preset clamp (‖δ‖ ≤ 4·‖v_init‖, v* cached by commands.sh) and at the
# 0.75 that MEMIT/EMMET use.
for clamp in 4.0 0.75; do
  dir="$OUT/rome-n50-ge-clamp$clamp"
  [ -f "$dir/summary.json" ] && { echo "have $dir"; continue; }
  "$EMMET" eval --model smollm2-135m --data "$DATA" --n 50 --generation-every 1 --seed 0 \
    --algo rome --batch-size 1 --set clamp_norm_factor="$clamp" --set value_early_stop=loss --out "$dir"
done
