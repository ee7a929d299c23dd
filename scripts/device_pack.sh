#!/usr/bin/env bash
# Packs what the GPU machine needs into .device/ (gitignored; carry it with the device tool):
# the stripped release `sage`, the stripped GPU test binaries (kernel parity; the SAGE step; the
# EfficientNet encoder), and
# the kernels' PTX for sm_90 and sm_80 (so the device needs no NVRTC). About 16 MB. Then, on the
# device:
#   bash scripts/device_run.sh          (doctor, parity, compute-sanitizer, kernel benchmark)
# The SAGE step's ten-step GPU check needs the real weights too: scripts/device_pack_assets.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --bin sage
# The executable of integration test $1.
test_binary() {
  cargo test --release --test "$1" --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
rm -rf .device/bin .device/home && mkdir -p .device/bin .device/home
strip -o .device/bin/sage "$target/release/sage"
for t in kernels_parity sage_step efficientnet; do
  strip -o ".device/bin/$t" "$(test_binary "$t")"
done
# Compile with this machine's NVRTC (the pinned wheel in $SAGE_HOME), then copy the PTX over.
mkdir -p .device/home/kernels-cache
.device/bin/sage --json kernels build --arch 80,90 \
  | python3 -c 'import json,sys; print("\n".join(k["path"] for k in json.load(sys.stdin)["kernels"]))' \
  | xargs -I{} cp {} .device/home/kernels-cache/
du -sh .device
