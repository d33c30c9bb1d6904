#!/usr/bin/env bash
# The accuracy–robustness study of docs/RESULTS.md on the embedded mnist5k digits.
#
# Same model (cnn7-tiny), data (3,500 training digits, 500 for model selection), epoch budget
# (16 epochs: 1 standard, a 6-epoch ramp, 9 at ε_max = 0.4) and seed for every method:
#   ACERT      κ ∈ {0, 0.25, 0.5, 0.75}             (adaptive per-sample radii)
#   IBP        ε_train ∈ {0.1, 0.2, 0.3, 0.4}       (Shi et al. warm-up, κ = 0)
#   SABR       λ ∈ {0.2, 0.5} at ε_train = 0.4      (PGD with 5 steps)
#   MTL-IBP    α ∈ {0.5, 0.9} at ε_train = 0.4      (PGD with 5 steps)
#   standard training
# Every final model is evaluated on the 1,000 test digits with IBP. The ACERT and IBP fronts are
# also certified with CROWN beside IBP on a stratified subset of 100 test digits (CROWN's cost
# grows with the unstable ReLUs, so it is left out for the SABR, MTL-IBP and standard models).
# Sized for 2 CPU cores and under an hour; the study folder is resumable: run the script again
# to finish an interrupted study.
#
# usage: bash experiments/mnist5k_tradeoff.sh [STUDY_FOLDER]
set -euo pipefail
study=${1:-runs/mnist5k-tradeoff}
common=(--dataset mnist5k --model cnn7-tiny --epochs 16 --reg-epochs 6 --seed 0
        --study "$study" --certify-limit 100 --quiet)
both=(--bounds ibp,crown)
attack=(--bounds ibp --set pgd_steps=5)

start=$(date +%s)
acert sweep "${common[@]}" "${both[@]}" --method acert --grid kappa=0,0.25,0.5,0.75
acert sweep "${common[@]}" "${both[@]}" --method ibp --grid eps_train=0.1,0.2,0.3,0.4
acert sweep "${common[@]}" "${attack[@]}" --method sabr --grid sabr_lambda=0.2,0.5
acert sweep "${common[@]}" "${attack[@]}" --method mtl-ibp --grid mtl_alpha=0.5,0.9
acert sweep "${common[@]}" --bounds ibp --method standard
acert plot "$study" --bound ibp
acert plot "$study" --bound crown
echo "study finished in $(( ($(date +%s) - start) / 60 )) minutes: $study/study.md"
