#!/usr/bin/env bash
# Adaptive radii for every certified loss (issue 21, item 3; docs/METHOD.md, "Adaptive radii for
# every certified loss"): adaptive-<base> beside its fixed-ε original and ACERT, three seeds,
# judged by IBP and by the tightest certificate.
#
# Budgets, model, data and optimiser are those of experiments/tradeoff.sh:
#   mnist5k        2,000 training digits, batch 32, 12 epochs (1 standard, 6 ramp), ε_max 0.4
#   fashion-mnist  2,500 training images, batch 64, 10 epochs (1 standard, 4 ramp), ε_max 0.1
# cnn7-tiny, Adam one-cycle 2e-3, 5-step training attacks, the best epoch on the held-out tenth.
#
# Methods, per dataset (the strongest baselines of docs/RESULTS.md: CROWN-IBP and MTL-IBP on
# mnist5k, TAPS and STAPS on Fashion-MNIST; all four run on both datasets):
#   acert               κ ∈ {0, 0.5, 0.9, 0.98}
#   crown-ibp           κ ∈ {0, 0.5}             adaptive-crown-ibp κ ∈ {0, 0.5}
#   mtl-ibp             α ∈ {0.5, 0.9}           adaptive-mtl-ibp   α ∈ {0.5, 0.9}, κ = 0
#   taps, staps         one point (λ = 0.4)      adaptive-taps, adaptive-staps κ ∈ {0, 0.5}
# (κ of adaptive-taps/staps is the wrapper's clean weight, which the originals do not have.)
# Seeds 0, 1, 2 for every point, seed by seed, so that an interrupted study has whole seeds.
#
# Certificates: every final model on the same EVAL_LIMIT (default 500) test images
# (eval_seed 0 for every run and seed): IBP, and the best of IBP, CROWN-IBP and CROWN
# (--bound best --cascade: CROWN-IBP and CROWN only where the bounds before leave a sample below
# the cap and can beat its radius), each with the attack radii (--attack) as the upper bound:
# certify_ibp.json and certify_best.json in each run, study.md, and per certificate the
# trade-off figures and seeds.md (acert plot: the points over seeds, the gaps to ACERT's front).
#
# Cost (estimated from tradeoff.sh's ~5 min per mnist5k point on one core and the cascade's
# cost in docs/PERFORMANCE.md): ~60 runs per dataset, ~5-6 hours of training per dataset plus
# the certificates; run it in parts (it is resumable: run the same command again, finished
# points and certificates are skipped). PARTS: SEEDS="0" (default "0 1 2") and CERTIFY=0 to
# train only; CERTIFY_ONLY=1 to certify what is finished; METHODS="acert taps" for some methods.
#
# usage: bash experiments/adaptive_study.sh DATASET [STUDY_FOLDER]   (default experiments/results/adaptive-DATASET;
#        before committing it: python experiments/keep_study.py experiments/results/adaptive-DATASET)
#        SMOKE=1 bash experiments/adaptive_study.sh mnist5k /tmp/smoke   # one tiny point
set -uo pipefail
dataset=${1:?usage: bash experiments/adaptive_study.sh mnist5k|fashion-mnist [STUDY_FOLDER]}
study=${2:-experiments/results/adaptive-$dataset}  # kept in the repository: experiments/keep_study.py
limit=${EVAL_LIMIT:-500}
seeds=${SEEDS:-0 1 2}
case $dataset in
  mnist5k)
    budget=(--train-limit 2000 --val-size 200 --batch-size 32 --epochs 12 --reg-epochs 6) ;;
  fashion-mnist)
    budget=(--train-limit 2500 --val-size 250 --batch-size 64 --epochs 10 --reg-epochs 4) ;;
  *) echo "adaptive_study.sh: sized for mnist5k or fashion-mnist, got $dataset" >&2; exit 2 ;;
esac
model=cnn7-tiny
if [[ -n ${SMOKE:-} ]]; then  # a smoke check of the script: one tiny point, 40 images
  budget=(--train-limit 200 --val-size 20 --batch-size 50 --epochs 2 --reg-epochs 1)
  model=mlp-small limit=40 seeds=0
fi
threads=()
[[ -n ${THREADS:-} ]] && threads=(--threads "$THREADS")
common=(--dataset "$dataset" --model "$model" "${budget[@]}" --eval-limit "$limit"
        --eval-seed 0 --lr 0.002 --set pgd_steps=5 --study "$study" --quiet "${threads[@]}")
failed=()

sweep() {  # one sweep; a failure is reported at the end instead of ending the study
  echo "== acert sweep $*"
  acert sweep "${common[@]}" --bounds ibp --certify-limit "$limit" "$@" || failed+=("$*")
}

declare -A grids=(
  [acert]="kappa=0,0.5,0.9,0.98"
  [crown-ibp]="kappa=0,0.5"        [adaptive-crown-ibp]="kappa=0,0.5"
  [mtl-ibp]="mtl_alpha=0.5,0.9"    [adaptive-mtl-ibp]="mtl_alpha=0.5,0.9"
  [taps]=""                        [adaptive-taps]="kappa=0,0.5"
  [staps]=""                       [adaptive-staps]="kappa=0,0.5"
)
methods=(acert crown-ibp adaptive-crown-ibp mtl-ibp adaptive-mtl-ibp taps adaptive-taps
         staps adaptive-staps)
[[ -n ${SMOKE:-} ]] && methods=(adaptive-crown-ibp)
[[ -n ${METHODS:-} ]] && read -ra methods <<< "$METHODS"  # a part of the study: METHODS="acert taps"

start=$(date +%s)
if [[ -z ${CERTIFY_ONLY:-} ]]; then
  for seed in $seeds; do
    for method in "${methods[@]}"; do
      grid=()
      [[ -n ${grids[$method]} ]] && grid=(--grid "${grids[$method]}")
      sweep --method "$method" "${grid[@]}" --grid "seed=$seed"
    done
    echo "seed $seed finished after $(( ($(date +%s) - start) / 60 )) minutes"
  done
fi

certified() {  # $1: the JSON of a certificate; true when it holds $limit images and attack radii
  [[ -f $1 ]] && grep -q '"n": '"$limit," "$1" && grep -q '"acr_attack"' "$1"
}

if [[ ${CERTIFY:-1} != 0 ]]; then
  for run in "$study"/*/; do
    run=${run%/}
    [[ -f $run/test_metrics.json ]] || continue  # not finished
    for bound in ibp best; do  # certify_ibp.json (the sweep's, now with attack radii), certify_best.json
      certified "$run/certify_$bound.json" && continue
      echo "== acert certify $run --bound $bound"
      acert certify "$run" --bound "$bound" --cascade --limit "$limit" --attack \
        --pgd-steps 0 --quiet > /dev/null || failed+=("certify $run $bound")
    done
  done
fi

python -c "from acert.records.study import write_study_table; write_study_table('$study')"
for bound in ibp best; do  # the trade-off figures; seeds.md: the points over seeds, the verdicts
  acert plot "$study" --bound "$bound" || failed+=("plot $bound")
done
echo "study finished in $(( ($(date +%s) - start) / 60 )) minutes: $study/study.md"
if (( ${#failed[@]} )); then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
