#!/usr/bin/env bash
# A colour export checked by αβ-CROWN itself, in its default patches mode (docs/VERIFIERS.md,
# "A colour export run on αβ-CROWN"): a cnn7-tiny trained briefly with IBP on a CIFAR-10 subset
# (three nonzero means, a zero-padded first conv), exported with `acert export`, run with
# αβ-CROWN's abcrown.py on the exported abcrown.yaml, and its verdicts compared with acert's
# certificates of the same inputs (best of IBP, CROWN-IBP, CROWN).
#
# Nothing of αβ-CROWN is in this repository. Set, in the environment:
#   WORK       scratch folder (default /work/verifier): data, run, benchmark, logs
#   ABCROWN    αβ-CROWN's complete_verifier folder (CTRAIN 0.6.1's wheel, unpacked:
#              CTRAIN/verification_systems/abCROWN/complete_verifier)
#   VERIFIER_PY  python of a separate environment with torch and what αβ-CROWN imports:
#              auto_LiRPA installed from its source repository, onnx2pytorch, onnx,
#              onnxruntime, onnxoptimizer, onnxsim, pyyaml, appdirs, sortedcontainers, psutil,
#              pandas, scipy, graphviz, gurobipy (docs/VERIFIERS.md lists the versions used)
#   VERIFIER_PATH  extra PYTHONPATH for that python (optional)
#   CIFAR_JPEG the CIFAR-10 JPEG archive (default ../shared/data/cifar10-jpeg-q75.tar.gz)
#   EPS (default 2/255), N properties (default 30), TIMEOUT seconds each (default 30)
#   PGD_RESTARTS  restarts of αβ-CROWN's PGD attack before bounding (default 3; αβ-CROWN's own
#              default of 30, at 100 steps each, takes about 2 minutes per property on one core
#              of this machine, past the timeout, which does not cut the attack short)
# acert runs from the environment this script is started in (`acert` on the PATH).
# Everything runs on one thread: OMP/MKL threads 1, acert --threads 1, and `taskset -c 0`
# for αβ-CROWN where taskset exists.
set -euo pipefail

WORK=${WORK:-/work/verifier}
ABCROWN=${ABCROWN:?set ABCROWN to alpha-beta-CROWN\'s complete_verifier folder}
VERIFIER_PY=${VERIFIER_PY:?set VERIFIER_PY to the python of the verifier environment}
HERE=$(cd "$(dirname "$0")" && pwd)
CIFAR_JPEG=${CIFAR_JPEG:-$HERE/../../shared/data/cifar10-jpeg-q75.tar.gz}
EPS=${EPS:-0.00784313725490196}
N=${N:-30}
TIMEOUT=${TIMEOUT:-30}
PGD_RESTARTS=${PGD_RESTARTS:-3}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

DATA=$WORK/data
BATCHES=$DATA/cifar-10-batches-py
RUN=$WORK/run
BENCH=$WORK/bench

# 1. CIFAR-10 (JPEG q75 copy): 300 training and 100 test images per class as python batches
if [ ! -f "$BATCHES/test_batch" ]; then
  mkdir -p "$DATA"
  [ -d "$DATA/train" ] || tar -xzf "$CIFAR_JPEG" -C "$DATA"
  python "$HERE/verify_colour_export.py" batches "$DATA" "$BATCHES" --train 300 --test 100
fi

# 2. a small colour model: cnn7-tiny, IBP at ε, 6 epochs (1 standard, a 2-epoch ramp)
if [ ! -f "$RUN/checkpoints/last.pt" ]; then
  acert train --dataset cifar10 --data-dir "$DATA" --model cnn7-tiny --method ibp \
    --eps-max "$EPS" --set "cert_eps=[$EPS]" --stn-epochs 1 --reg-epochs 2 --epochs 6 \
    --batch-size 64 --val-size 0 --eval-limit 200 --threads 1 --quiet --out "$RUN"
fi

# 3. the benchmark: N correctly classified test images at ε
rm -rf "$BENCH"
acert export "$RUN" --data-dir "$DATA" --onnx "$BENCH/onnx/net.onnx" --vnnlib "$BENCH/vnnlib" \
  --eps "$EPS" --n "$N" --timeout "$TIMEOUT" --only-correct

# 4. αβ-CROWN in its default patches mode, on the CPU, one thread
PIN=()
command -v taskset > /dev/null && PIN=(taskset -c 0)
start=$(date +%s)
(cd "$ABCROWN" && PYTHONPATH=${VERIFIER_PATH:-} "${PIN[@]}" "$VERIFIER_PY" abcrown.py \
  --config "$BENCH/abcrown.yaml" --results_file "$BENCH/abcrown_results.pkl" \
  --pgd_restarts "$PGD_RESTARTS") \
  > "$WORK/abcrown.log" 2>&1
echo "alpha-beta-CROWN: $(( $(date +%s) - start )) s wall (log: $WORK/abcrown.log)"

# 5. the verdicts beside acert's certificates
python "$HERE/verify_colour_export.py" verdicts "$BENCH" "$RUN" --eps "$EPS" --data-dir "$DATA"
