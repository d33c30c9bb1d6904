#!/usr/bin/env bash
# The training radius search's cost against its benefit (docs/PERFORMANCE.md, "The training
# search: cost against benefit"): ACERT fronts trained with a cheaper search than the
# specification's (Brent, rtol 1e-4, at most 10 evaluations after the cap, warm starts).
#
#   fast  radius_rtol = 1e-2, radius_max_iter = 4
#   one   radius_max_iter = 1: the cap, then one probe beside last epoch's radius (warm start),
#         close to carrying the radius over from the last epoch
#
# Same data, model and budget as experiments/tradeoff.sh on mnist5k (its ACERT runs at κ = 0.5
# and 0.9, seeds 0–2, are the specification's front), κ ∈ {0.5, 0.9}, seeds 0, 1, 2.
# Epoch times come with each run (metrics.csv); experiments/search_cost_timing.py measures the
# ACERT/IBP epoch ratios of every setting in one process.
#
# usage: bash experiments/search_cost.sh fast|one [STUDY_FOLDER]
set -uo pipefail
variant=${1:?usage: bash experiments/search_cost.sh fast|one [STUDY_FOLDER]}
study=${2:-runs/search-cost}
case $variant in
  fast) search=(--grid radius_rtol=0.01 --grid radius_max_iter=4) ;;
  one) search=(--grid radius_max_iter=1) ;;
  *) echo "search_cost.sh: the variants are fast and one, got $variant" >&2; exit 2 ;;
esac
threads=()
[[ -n ${THREADS:-} ]] && threads=(--threads "$THREADS")
acert sweep --dataset mnist5k --model cnn7-tiny --train-limit 2000 --val-size 200 \
  --eval-limit 1000 --epochs 12 --reg-epochs 6 --batch-size 32 --lr 0.002 --set pgd_steps=5 \
  --study "$study" --quiet "${threads[@]}" --bounds ibp \
  --method acert "${search[@]}" --grid kappa=0.5,0.9 --grid seed=0,1,2
