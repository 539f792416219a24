#!/usr/bin/env bash
# What stops EMMET's collapse at batch 1,000 on smollm2-135m (results/README.md): the
# same run with a larger ridge ρ = mom2_update_weight · emmet_lambda (preset: 1 · 0.1).
# The v* come from the value cache that results/commands.sh filled, so each run is the
# keys, the solve and the scoring only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/counterfact/counterfact-edit.json}
EMMET=${EMMET:-.venv/bin/emmet}
OUT=results/smollm2-135m/ablation
for lam in ${LAMBDAS:-1000 100}; do
  dir="$OUT/emmet-b1000-lambda$lam"
  [ -f "$dir/summary.json" ] && { echo "have $dir"; continue; }
  "$EMMET" eval --model smollm2-135m --data "$DATA" --n 1000 --generation-every 10 --seed 0 \
    --algo emmet --batch-size 1000 --set emmet_lambda=$lam --out "$dir"
done
