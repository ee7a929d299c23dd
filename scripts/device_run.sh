#!/usr/bin/env bash
# Runs on the GPU machine (after scripts/device_pack.sh here): doctor, the kernel parity tests,
# compute-sanitizer memcheck and racecheck over the parity tests at their small shapes, and the
# kernel benchmark against PyTorch (benches/run_kernels.sh). Everything lands in $OUT (default
# ./device-out): copy the benchmark report into benches/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
export SAGE_HOME=$PWD/.device/home
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-$PWD/device-out}
mkdir -p "$out"
bin=$PWD/.device/bin
status=0
"$bin/sage" doctor 2>&1 | tee "$out/doctor.txt"
"$bin/kernels_parity" --nocapture --test-threads 1 2>&1 | tee "$out/parity.txt" || status=1
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck; do
  SAGE_PARITY_SMALL=1 "$sanitizer" --tool "$tool" --error-exitcode 3 "$bin/kernels_parity" --test-threads 1 \
    > "$out/sanitizer-$tool.txt" 2>&1 || status=1
  tail -3 "$out/sanitizer-$tool.txt"
done
SAGE="$bin/sage" OUT="$out" bash benches/run_kernels.sh "$@" || status=1
exit $status
