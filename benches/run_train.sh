#!/usr/bin/env bash
# `sage bench train` and its HF transformers counterpart (benches/train_hf.py) in one call on one
# machine, merged into benches/results/train-<stamp>.{json,md} (plus both raw outputs).
#
#   bash benches/run_train.sh [--batch 1 --seq 128 --steps 3 --gen-tokens 32 --gen-batch 1,16 ...]
#
# The same arguments go to both sides. PYTHON picks the interpreter (it needs torch and
# transformers); SAGE the binary; SAGE_DEVICE its --device (auto: the GPU when one works, as
# PyTorch does); OUT the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
SAGE=${SAGE:-target/release/sage}
PYTHON=${PYTHON:-python3}
out=${OUT:-benches/results}
threads=${SAGE_THREADS:-$(nproc)}
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
tmp=$(mktemp -d)
{ (nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true)
  echo "$(nproc) CPU cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"; } | paste -sd';' > "$tmp/env.txt"
"$SAGE" --device "${SAGE_DEVICE:-auto}" --threads "$threads" --json bench train "$@" > "$tmp/sage.json"
"$PYTHON" benches/train_hf.py --threads "$threads" "$@" > "$tmp/hf.json"
cp "$tmp/sage.json" "$out/train-$stamp.sage.json"
cp "$tmp/hf.json" "$out/train-$stamp.hf.json"
"$PYTHON" benches/report_train.py "$tmp/sage.json" "$tmp/hf.json" --env "$tmp/env.txt" --out "$out/train-$stamp"
