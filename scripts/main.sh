#!/usr/bin/env bash
# The main job on the embedded default: install what is missing, build sage (and the openai judge
# plugin), fetch the pinned assets into $SAGE_HOME, and run the whole pipeline on ELPV at the two-core
# size (`sage demo --quick`: data, facts, judge scores, SFE, E-DPO, eval, the ablation table).
# Extra arguments go to `sage demo` (e.g. `--out DIR`); the full profile, meant for a GPU, is
# `./target/release/sage demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release
sage="${CARGO_TARGET_DIR:-target}/release/sage"
"$sage" fetch
"$sage" demo --quick "$@"
