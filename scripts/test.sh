#!/usr/bin/env bash
# The test command: builds sage and the in-tree external plugin (judge-openai, beside the binary,
# where the tests find it), makes sure the real assets and test images are in $SAGE_HOME, then
# runs the whole workspace's suite with cargo-nextest (release profile: the model tests run real
# networks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
cargo build --release --quiet
# Models and data, plus NVRTC, CUDA headers and ptxas for the kernel compile checks.
"${CARGO_TARGET_DIR:-target}/release/sage" fetch --cuda
scripts/fetch-test-images.sh
cargo nextest run --release --workspace --no-fail-fast "$@"
