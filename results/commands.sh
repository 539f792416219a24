#!/usr/bin/env bash
# The exact commands behind results/README.md: smollm2-135m, the first 1,000 records of
# counterfact-edit.json, stats cached beforehand (`emmet stats`), run one after the other
# on one machine (never two heavy jobs at once: timings would be meaningless).
# Usage: results/commands.sh [DATA]   (DATA defaults to ../shared/data/counterfact/counterfact-edit.json)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/counterfact/counterfact-edit.json}
EMMET=${EMMET:-.venv/bin/emmet}
OUT=results/smollm2-135m
COMMON=(--model smollm2-135m --data "$DATA" --n 1000 --generation-every 10 --seed 0)

run() {  # algorithm batch-size [more eval options]
  local dir="$OUT/$1-b$2"
  [ -f "$dir/summary.json" ] && { echo "have $dir"; return; }
  "$EMMET" eval "${COMMON[@]}" --algo "$1" --batch-size "$2" --out "$dir" "${@:3}"
}

"$EMMET" stats --model smollm2-135m --layers 2-6  # C0 of every edited layer, cached (~1 min)

# Batch 1,000 first: this is where every fact's v* is optimised (then cached), so these
# two runs carry the full cost; the smaller batch sizes reuse the cached v*. ROME's v*
# live elsewhere (MLP output, larger clamp) and are optimised during its own run.
run emmet 1000
run rome 1 --set value_early_stop=loss  # ROME's preset when these results were made
run memit 1000
run memit 1
for b in 256 64 16 1; do run emmet "$b"; done
for b in 256 64 16; do run memit "$b"; done
"$EMMET" eval --plot "$OUT"/emmet-b* "$OUT"/memit-b* --out "$OUT"
