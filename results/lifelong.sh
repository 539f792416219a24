#!/usr/bin/env bash
# The lifelong runs behind results/lifelong.md: smollm2-135m, 2,000 records of
# counterfact-edit.json applied in sequential batches of 100 (the AlphaEdit protocol),
# measured every 200 edits; ROME one fact at a time for the first 500, measured every 100.
# Every run resumes from its folder if interrupted (from the weights saved after its last batch).
# Usage: results/lifelong.sh [DATA]   (DATA defaults to ../shared/data/counterfact/counterfact-edit.json)
#   ONLY="emmet memit" results/lifelong.sh   runs just those. On the 2-core machine two runs
#   went side by side with one thread each: ONLY=emmet OMP_NUM_THREADS=1 results/lifelong.sh &
#   (never two runs with two threads each: the spinning threads slow both several-fold).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/counterfact/counterfact-edit.json}
EMMET=${EMMET:-.venv/bin/emmet}
OUT=results/smollm2-135m-lifelong
ONLY=${ONLY:-encore alphaedit emmet memit rome}
COMMON=(--model smollm2-135m --data "$DATA" --sequential --generation-every 10 --seed 0
        --retention 200 --heldout 100 --documents 50)

run() {  # algorithm facts batch-size checkpoint-every [more eval options]
  local dir="$OUT/$1-seq"
  [[ " $ONLY " == *" $1 "* ]] || return 0
  [ -f "$dir/summary.json" ] && { echo "have $dir"; return; }
  "$EMMET" eval "${COMMON[@]}" --algo "$1" --n "$2" --batch-size "$3" --checkpoint-every "$4" --out "$dir" "${@:5}"
}

"$EMMET" stats --model smollm2-135m --layers 2-6  # C0 of every edited layer, cached
run encore 2000 100 200
run alphaedit 2000 100 200
run emmet 2000 100 200
run memit 2000 100 200
run rome 500 1 100 --set value_early_stop=loss  # ROME's preset when this run was made
"$EMMET" eval --plot "$OUT"/*-seq --out "$OUT"
