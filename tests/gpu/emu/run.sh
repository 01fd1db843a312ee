#!/usr/bin/env bash
# run.sh — the GPU spec (tests/lua/cuda_spec.lua) on the CUDA emulator, on a machine without a GPU:
# builds nrlua with -DNR_CUDA_EMU=ON (the CUDA backend's own sources, kernels included, linked with
# the CPU versions of the CUDA runtime, cuBLAS and cuDNN in this folder) and runs the spec on it.
#   tests/gpu/emu/run.sh [build dir]          (default build-emu; configured when it is not)
# ctest runs it as gpu/cuda_spec_emu (build dir: the ctest build's emu-build/ subfolder). After the
# spec, the benchmark runs of tests/gpu/run.sh at a batch of 2 (the script, not the speed).
# Environment: NR_SPEC_FILTER / NR_SPEC_TRACE as for tests/gpu/spec_runner.lua; NR_EMU_DEVICES,
# NR_EMU_DEVICE_MEMORY and NR_EMU_PROTECT=0 as in cudart_emu.cpp; NR_EMU_CMAKE_ARGS, more options
# for configuring the build dir (-DNR_SANITIZE=ON: the backend's host code under ASan + UBSan).
# What it is not: a GPU run. It checks the backend's logic (indexing, reductions, barriers, launch
# configurations, library arguments, host/device pointer use) against the CPU twins; speed,
# asynchrony, the real libraries' numerics and their algorithm choices need tests/gpu/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
B="${1:-build-emu}"
if [ ! -f "$B/CMakeCache.txt" ]; then
  # shellcheck disable=SC2086 # NR_EMU_CMAKE_ARGS is a list of options
  cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DNR_CUDA_EMU=ON ${NR_EMU_CMAKE_ARGS:-} > "$B.configure.log" 2>&1 ||
    { cat "$B.configure.log"; echo "emu/run.sh: configuring $B failed"; exit 2; }
fi
cmake --build "$B" -j "$(nproc)" --target nrlua > "$B.build.log" 2>&1 ||
  { tail -n 40 "$B.build.log"; echo "emu/run.sh: building $B failed"; exit 2; }
"$B/nrlua" -e 'local nr = require "nr"; assert(nr.cuda.available(), "the emulated GPU is not available")'
"$B/nrlua" tests/gpu/spec_runner.lua tests/lua/cuda_spec.lua
# the benchmark runs of tests/gpu/run.sh, shrunk to a batch of 2: each must end with its JSON line
# (the script itself is checked, not the speed), and the per-layer profile must print
[ -n "${NR_SPEC_FILTER:-}" ] && exit 0
bench() {
  local last
  last="$("$B/nrlua" bench/gpu_bench.lua --batch 2 --warmup 1 --steps 1 "$@" 2>&1 | tail -n 1)"
  case "$last" in
    '{'*'"images_per_s"'*) echo "ok    gpu_bench.lua $*" ;;
    *) echo "FAIL  gpu_bench.lua $*: $last"; return 1 ;;
  esac
}
bench --model mobilenet --precision fp32 --tf32 1
bench --model mobilenet --precision bf16 --tf32 1
bench --model mobilenet --precision bf16 --tf32 1 --trainer 1
bench --model mobilenet --precision bf16 --memory_format contiguous --tf32 1
NR_PROFILE=sync "$B/nrlua" bench/gpu_bench.lua --model mobilenet --precision bf16 --batch 2 --warmup 1 --steps 2 2>&1 |
  grep -q 'Conv2d' || { echo "FAIL  NR_PROFILE=sync gpu_bench.lua printed no per-layer profile"; exit 1; }
echo "ok    NR_PROFILE=sync gpu_bench.lua (per-layer profile)"
