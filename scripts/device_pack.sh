#!/usr/bin/env bash
# Packs what the GPU machine needs into .device/ (gitignored; carry it with the device tool):
# the stripped release `sage`, the stripped GPU parity test binary, and the kernels' PTX for
# sm_90 and sm_80 (so the device needs no NVRTC). About 13 MB. Then, on the device:
#   bash scripts/device_run.sh          (doctor, parity, compute-sanitizer, kernel benchmark)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --bin sage
parity=$(cargo test --release --test kernels_parity --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kernels_parity" and m.get("executable"):
        print(m["executable"])')
rm -rf .device && mkdir -p .device/bin .device/home
strip -o .device/bin/sage "$target/release/sage"
strip -o .device/bin/kernels_parity "$parity"
# Compile with this machine's NVRTC (the pinned wheel in $SAGE_HOME), then copy the PTX over.
mkdir -p .device/home/kernels-cache
.device/bin/sage --json kernels build --arch 80,90 \
  | python3 -c 'import json,sys; print("\n".join(k["path"] for k in json.load(sys.stdin)["kernels"]))' \
  | xargs -I{} cp {} .device/home/kernels-cache/
du -sh .device
