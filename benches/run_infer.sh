#!/usr/bin/env bash
# `sage bench infer --llama-cpp` on this machine: sage from the GGUF's quantized blocks, sage in
# f32 and llama.cpp (llama-cpp-python, built here for this CPU) on the same files, the same token
# ids and the same threads, in one run. Writes benches/results/infer-<stamp>.json (the raw
# report) and .txt (the table), with the machine and versions.
#
#   bash benches/run_infer.sh [--models lite,dino-qwen --decode-tokens 32 --batch 1,16 ...]
#
# VENV: where llama-cpp-python is installed (created when missing; the build takes minutes).
# SAGE: the binary. OUT: the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
SAGE=${SAGE:-target/release/sage}
VENV=${VENV:-.venv-llama-cpp}
out=${OUT:-benches/results}
threads=${SAGE_THREADS:-$(nproc)}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  python3 -m venv "$VENV"
  cmake_args="-DGGML_NATIVE=ON"
  if grep -qw amx_tile /proc/cpuinfo; then
    # llama.cpp 0.3.36 built natively on an AMX Xeon (this project's VM, 2026-12-05) crashed in
    # its AMX matmul (ggml_backend_amx_mul_mat, SIGSEGV at the first decode). Build every other
    # x86 extension the CPU has instead; sage has no AMX path either.
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    for f in avx512f:GGML_AVX512 avx512vbmi:GGML_AVX512_VBMI avx512_vnni:GGML_AVX512_VNNI \
             avx512_bf16:GGML_AVX512_BF16 avx_vnni:GGML_AVX_VNNI; do
      grep -qw "${f%%:*}" /proc/cpuinfo && cmake_args="$cmake_args -D${f#*:}=ON"
    done
  fi
  CMAKE_ARGS="$cmake_args" "$VENV/bin/pip" install -q numpy llama-cpp-python==0.3.36
fi
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
env_line="$(nproc) CPU cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $("$SAGE" --version)"
SAGE_PYTHON="$VENV/bin/python" "$SAGE" --threads "$threads" --json bench infer --llama-cpp "$@" > "$out/infer-$stamp.json"
python3 benches/report_infer.py "$out/infer-$stamp.json" --env "$env_line" \
  --command "$SAGE --threads $threads bench infer --llama-cpp $*" > "$out/infer-$stamp.md"
cat "$out/infer-$stamp.md"
