#!/usr/bin/env bash
# The consecutive-editing benchmarks of docs/benchmarks.md (default model, CPU). Reports on COUNTERFACT
# cases from 5000 on (the layers and λ were tuned on cases 0-1999: docs/layers.md).
#   bash bench/eval_runs.sh 200     # 20 steps x 10, three methods side by side (25 min on 2 cores)
#   bash bench/eval_runs.sh 1000    # 100 steps x 10, COMEBA-HK, inference speed at 0/100/1000 edits (37 min)
#   bash bench/eval_runs.sh 1000-no-hook; bash bench/eval_runs.sh 1000-memit   # the same cases, one method each (38-40 min)
#   .venv/bin/python bench/report_tables.py --merge bench/out/eval-1000-3.json \
#       bench/out/eval-1000.json bench/out/eval-1000-no-hook.json bench/out/eval-1000-memit.json --plot docs/img/eval-1000-3.png
#   bash bench/eval_runs.sh zsre    # 20 steps x 10 on zsRE, three methods
#   bash bench/eval_runs.sh 5000    # 500 steps x 10, the shipped method, every 5th edit scored, every 10th decoded;
#                                   # checkpointed: run it again after a stop and it goes on (~2.5 h on 2 cores)
#   bash bench/eval_runs.sh 5000-fresh  # the same, each step solved without Σ K Kᵀ (method comeba-hk-fresh)
#   bash bench/eval_runs.sh tune-fresh  # 1,000 tuning edits (cases 0-999), shipped and comeba-hk-fresh side by side
#   bash bench/eval_runs.sh 5000-window # 5,000 report edits, Σ K Kᵀ over the last 50 steps only (method comeba-hk-window)
#   bash bench/eval_runs.sh 5000-zscore; ... 5000-no-hook; ... 5000-memit   # the side by side at 5,000, one method each
#   bash bench/eval_runs.sh tune-window # 1,000 tuning edits (cases 0-999), comeba-hk-window beside tune-fresh's runs
#   EVAL_EVERY=250 bash bench/eval_runs.sh 5000-no-hook   # evaluated at 2,500 and 5,000 edits only (3 fewer evaluations, ~4 min each here)
# The 5000-* and tune-window runs reuse the unedited model's scores of an earlier run on their cases (reuse_base).
set -euo pipefail
cd "$(dirname "$0")/.."
KBSYNC=".venv/bin/kbsync --state-dir ${STATE:-.cache/state}"
# reuse_base FROM TO: start checkpoint TO with the unedited model's scores of checkpoint FROM (same cases
# and options), when TO has none yet and FROM has them
reuse_base() {
  if [ ! -e "$2/base.pt" ] && [ -e "$1/base.pt" ]; then mkdir -p "$2" && cp "$1/base.pt" "$2/base.pt"; fi
}
# run5000 METHOD NAME: 500 x 10 on COUNTERFACT 5000-9999, checkpointed in bench/out/ckpt-5000-NAME
run5000() {
  local ck="bench/out/ckpt-5000-$2" from
  for from in bench/out/ckpt-5000-*/; do reuse_base "${from%/}" "$ck"; done   # any run of the same cases
  $KBSYNC eval --dataset counterfact --cases 5000:10000 --steps 500 --batch 10 --eval-every "${EVAL_EVERY:-100}" \
    --gen-every 10 --score-every 5 --method "$1" --checkpoint "$ck" \
    --json "bench/out/eval-5000-$2.json" --plot "docs/img/eval-5000-$2.png"
}
case "${1:-200}" in
  200)  $KBSYNC eval --dataset counterfact --cases 5000:5200 --steps 20 --batch 10 --eval-every 5 \
          --method comeba-hk,no-hook,memit --speed-at 0,100 \
          --json bench/out/eval-200.json --plot docs/img/eval-200.png ;;
  1000) $KBSYNC eval --dataset counterfact --cases 5000:6000 --steps 100 --batch 10 --eval-every 50 \
          --method comeba-hk --speed-at 0,100,1000 \
          --json bench/out/eval-1000.json --plot docs/img/eval-1000.png ;;
  1000-no-hook|1000-memit)
        m="${1#1000-}"
        $KBSYNC eval --dataset counterfact --cases 5000:6000 --steps 100 --batch 10 --eval-every 50 --gen-every 5 \
          --method "$m" --json "bench/out/eval-1000-$m.json" --plot "bench/out/eval-1000-$m.png" ;;
  5000)        run5000 comeba-hk prefix ;;
  5000-fresh)  run5000 comeba-hk-fresh fresh ;;
  5000-window) run5000 comeba-hk-window window ;;
  5000-zscore) run5000 comeba-hk@zscore zscore ;;
  5000-no-hook|5000-memit) run5000 "${1#5000-}" "${1#5000-}" ;;
  tune-fresh)
        $KBSYNC eval --dataset counterfact --cases 0:1000 --steps 100 --batch 10 --eval-every 50 --gen-every 5 \
          --score-every 2 --method comeba-hk,comeba-hk-fresh --checkpoint bench/out/ckpt-1000-tune-fresh \
          --json bench/out/eval-1000-tune-fresh.json --plot docs/img/eval-1000-tune-fresh.png ;;
  tune-window)
        reuse_base bench/out/ckpt-1000-tune-fresh bench/out/ckpt-1000-tune-window
        $KBSYNC eval --dataset counterfact --cases 0:1000 --steps 100 --batch 10 --eval-every 50 --gen-every 5 \
          --score-every 2 --method comeba-hk-window --checkpoint bench/out/ckpt-1000-tune-window \
          --json bench/out/eval-1000-tune-window.json --plot docs/img/eval-1000-tune-window.png ;;
  zsre) $KBSYNC eval --dataset zsre --cases 0:200 --steps 20 --batch 10 --eval-every 5 \
          --method comeba-hk,no-hook,memit \
          --json bench/out/eval-zsre-200.json --plot docs/img/eval-zsre-200.png ;;
  *) echo "usage: bash bench/eval_runs.sh 200|1000|1000-no-hook|1000-memit|5000|5000-fresh|5000-window|5000-zscore|5000-no-hook|5000-memit|tune-fresh|tune-window|zsre" >&2; exit 2 ;;
esac
