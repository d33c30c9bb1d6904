#!/usr/bin/env bash
# Every study of docs/RESULTS.md and the search-cost study of docs/PERFORMANCE.md, in two lanes of
# one thread each on a 2-core machine (about 2 hours); the folders are resumable.
#
# usage: bash experiments/run_all.sh [FOLDER]   (default runs/, logs in FOLDER/*.log)
set -uo pipefail
out=${1:-runs}
mkdir -p "$out"
start=$(date +%s)
export THREADS=1
# the fast search's front is not trained: it saves ~6% of an epoch (search_cost_timing.py)
bash experiments/tradeoff.sh mnist5k "$out/tradeoff-mnist5k" \
  > "$out/lane-mnist5k.log" 2>&1 &
( bash experiments/tradeoff.sh fashion-mnist "$out/tradeoff-fashion-mnist"
  bash experiments/search_cost.sh one "$out/search-cost" ) > "$out/lane-fashion-mnist.log" 2>&1 &
wait
echo "all studies finished in $(( ($(date +%s) - start) / 60 )) minutes"
