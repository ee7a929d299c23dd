#!/usr/bin/env bash
# Runs on the GPU machine (after scripts/device_pack.sh here): doctor, the kernel parity tests
# (the ten-step CUDA-vs-CPU training-step test among them), compute-sanitizer memcheck and
# racecheck over the parity tests at their small shapes, the kernel benchmark against PyTorch
# (benches/run_kernels.sh) and the training-step benchmark against HF transformers
# (benches/run_train.sh), and, with the real assets carried (scripts/device_pack_assets.sh), the
# SAGE step's tests (tests/sage_step.rs: ten quick-config SFE steps on the GPU against the CPU
# ops) and the EfficientNet encoder on the GPU against the same model on the CPU ops
# (tests/efficientnet.rs). Everything lands in $OUT (default ./device-out): copy the reports into benches/results/
# and commit them.
#
#   STAGES="doctor parity sanitizer kernels train" bash scripts/device_run.sh
#   STAGES="assets sage" bash scripts/device_run.sh     (after carrying .device/assets/part-*)
# STAGES picks a subset (one device call each, when the 10-minute limit per call is tight);
# TRAIN_ARGS overrides the training benchmark's arguments.
set -uo pipefail
cd "$(dirname "$0")/.."
export SAGE_HOME=$PWD/.device/home
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-$PWD/device-out}
stages=${STAGES:-doctor parity sanitizer kernels train}
mkdir -p "$out"
bin=$PWD/.device/bin
status=0
has() { [[ " $stages " == *" $1 "* ]]; }
if has doctor; then "$bin/sage" doctor 2>&1 | tee "$out/doctor.txt"; fi
if has parity; then "$bin/kernels_parity" --nocapture --test-threads 1 2>&1 | tee "$out/parity.txt" || status=1; fi
if has sanitizer; then
  sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    SAGE_PARITY_SMALL=1 "$sanitizer" --tool "$tool" --error-exitcode 3 "$bin/kernels_parity" --test-threads 1 \
      > "$out/sanitizer-$tool.txt" 2>&1 || status=1
    tail -3 "$out/sanitizer-$tool.txt"
  done
fi
if has assets; then
  cat .device/assets/part-* | tar -C "$SAGE_HOME" -xf - || status=1
fi
if has sage; then
  "$bin/sage_step" --nocapture --test-threads 1 2>&1 | tee "$out/sage_step.txt" || status=1
  # Only the GPU test: the others read fixtures from the source tree or build the emulator.
  "$bin/efficientnet" --exact efficientnet_on_the_gpu_matches_the_cpu_encoder --nocapture 2>&1 \
    | tee "$out/efficientnet.txt" || status=1
fi
if has kernels; then SAGE="$bin/sage" OUT="$out" bash benches/run_kernels.sh || status=1; fi
if has train; then
  # shellcheck disable=SC2086
  SAGE="$bin/sage" SAGE_DEVICE=cuda OUT="$out" bash benches/run_train.sh ${TRAIN_ARGS:---batch 8 --seq 1024 --steps 10} \
    || status=1
fi
exit $status
