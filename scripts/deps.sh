#!/usr/bin/env bash
# System packages the build and the tests need, installed only when missing (Debian/Ubuntu):
# python3 + pip (assets come from PyPI), a C/C++ compiler (C plugins, emulated kernel checks),
# libclang (bindgen generates the plugin ABI from plugins/include/sage_plugin.h).
set -euo pipefail
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
command -v dpkg >/dev/null || need_apt+=(dpkg)
{ command -v cc && command -v c++; } >/dev/null || need_apt+=(build-essential)
# libclang itself (libclang.so, libclang-NN.so.*), not libclang-cpp, which some images ship alone.
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so* \
  >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo is required: install the Rust toolchain with rustup" >&2
  exit 1
fi
