#!/usr/bin/env bash
# The kernel benchmark on the GPU machine (ARCHITECTURE.md §8, §9): `sage bench kernels` and the PyTorch
# references in one call on one device, merged into benches/results/kernels-<stamp>.{json,md}.
#
#   here:       bash scripts/device_pack.sh       (stripped sage + the PTX cache in .device/)
#   device:     bash benches/run_kernels.sh [--quick]   (or scripts/device_run.sh, which calls it)
#
# The PTX comes from the carried cache, so the device needs no NVRTC; cuBLASLt comes from the CUDA
# 13 toolkit's lib64. Set OUT to write the report elsewhere (the device tool's $OUT, say).
set -euo pipefail
cd "$(dirname "$0")/.."
SAGE=${SAGE:-$PWD/.device/bin/sage}
export SAGE_HOME=${SAGE_HOME:-$PWD/.device/home}
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
out=${OUT:-benches/results}
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
tmp=$(mktemp -d)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > "$tmp/env.txt" || echo "nvidia-smi unavailable" > "$tmp/env.txt"
"$SAGE" doctor
"$SAGE" --json bench kernels "$@" > "$tmp/sage.json"
python3 benches/kernels_torch.py "$@" > "$tmp/torch.json"
cp "$tmp/sage.json" "$out/kernels-$stamp.sage.json"
cp "$tmp/torch.json" "$out/kernels-$stamp.torch.json"
python3 benches/report.py "$tmp/sage.json" "$tmp/torch.json" --env "$tmp/env.txt" --out "$out/kernels-$stamp"
