#!/usr/bin/env bash
# run.sh — the GPU spec (tests/lua/cuda_spec.lua) on the CUDA emulator, on a machine without a GPU:
# builds nrlua with -DNR_CUDA_EMU=ON (the CUDA backend's own sources, kernels included, linked with
# the CPU versions of the CUDA runtime, cuBLAS and cuDNN in this folder) and runs the spec on it.
#   tests/gpu/emu/run.sh [build dir]          (default build-emu; configured when it is not)
# ctest runs it as gpu/cuda_spec_emu (build dir: the ctest build's emu-build/ subfolder). After the
# spec, the benchmark runs of tests/gpu/run.sh at a batch of 2 (the script, not the speed), then,
# where mpirun and libnr_dist are, nr.dist on GPUs under `mpirun -np 2` (each rank emulates its
# GPUs and takes cuda:<rank>; the emulator's NCCL, nccl_emu.c, carries the collectives over MPI):
# tests/dist/gpu.lua, a hung rank timing out in NCCL's wait (failure.lua hang cuda), a failed
# transfer (NR_EMU_NCCL_FAIL), 2 ranks on 1 GPU, nr.train on 2 ranks' GPUs against 1 process
# (train.lua) and with Neural Rejuvenation (train_nr.lua).
# Environment: NR_SPEC_FILTER / NR_SPEC_TRACE as for tests/gpu/spec_runner.lua; NR_EMU_DEVICES,
# NR_EMU_DEVICE_MEMORY and NR_EMU_PROTECT=0 as in cudart_emu.cpp; NR_EMU_CMAKE_ARGS, more options
# for configuring the build dir (-DNR_SANITIZE=ON: the backend's host code under ASan + UBSan);
# NR_EMU_PARTS, which parts run (default "spec bench dist").
# What it is not: a GPU run. It checks the backend's logic (indexing, reductions, barriers, launch
# configurations, library arguments, host/device pointer use) against the CPU twins; speed,
# asynchrony, the real libraries' numerics and their algorithm choices need tests/gpu/run.sh.
set -euo pipefail
cd "$(dirname "$0")/../../.."
B="${1:-build-emu}"
mkdir -p "$B" # its logs live inside it (beside it they were left in the source tree)
if [ ! -f "$B/CMakeCache.txt" ]; then
  # shellcheck disable=SC2086 # NR_EMU_CMAKE_ARGS is a list of options
  cmake -S . -B "$B" -DCMAKE_BUILD_TYPE=Release -DNR_CUDA_EMU=ON ${NR_EMU_CMAKE_ARGS:-} > "$B/emu-configure.log" 2>&1 ||
    { cat "$B/emu-configure.log"; echo "emu/run.sh: configuring $B failed"; exit 2; }
fi
targets=(nrlua)
[ -d "$B/CMakeFiles/nr_dist.dir" ] && targets+=(nr_dist) # built where CMake found MPI
cmake --build "$B" -j "$(nproc)" --target "${targets[@]}" > "$B/emu-build.log" 2>&1 ||
  { tail -n 40 "$B/emu-build.log"; echo "emu/run.sh: building $B failed"; exit 2; }
"$B/nrlua" -e 'local nr = require "nr"; assert(nr.cuda.available(), "the emulated GPU is not available")'
PARTS=" ${NR_EMU_PARTS:-spec bench dist} "
if [[ "$PARTS" == *" spec "* ]]; then
  "$B/nrlua" tests/gpu/spec_runner.lua tests/lua/cuda_spec.lua
fi
# the benchmark runs of tests/gpu/run.sh, shrunk to a batch of 2: each must end with its JSON line
# (the script itself is checked, not the speed), and the per-layer profile must print
[ -n "${NR_SPEC_FILTER:-}" ] && exit 0 # a chosen subset of the spec: nothing else
bench() {
  local last
  last="$("$B/nrlua" bench/gpu_bench.lua --batch 2 --warmup 1 --steps 1 "$@" 2>&1 | tail -n 1)"
  case "$last" in
    '{'*'"images_per_s"'*) echo "ok    gpu_bench.lua $*" ;;
    *) echo "FAIL  gpu_bench.lua $*: $last"; return 1 ;;
  esac
}
if [[ "$PARTS" == *" bench "* ]]; then
  bench --model mobilenet --precision fp32 --tf32 1
  bench --model mobilenet --precision bf16 --tf32 1
  bench --model mobilenet --precision bf16 --tf32 1 --trainer 1
  bench --model mobilenet --precision bf16 --memory_format contiguous --tf32 1
  NR_PROFILE=sync "$B/nrlua" bench/gpu_bench.lua --model mobilenet --precision bf16 --batch 2 --warmup 1 --steps 2 2>&1 |
    grep -q 'Conv2d' || { echo "FAIL  NR_PROFILE=sync gpu_bench.lua printed no per-layer profile"; exit 1; }
  echo "ok    NR_PROFILE=sync gpu_bench.lua (per-layer profile)"
fi

# ---- nr.dist on GPUs: 2 ranks, each with its own emulated GPUs, NCCL over MPI
[[ "$PARTS" == *" dist "* ]] || exit 0
if ! command -v mpirun > /dev/null || [ ! -f "$B/libnr_dist.so" ]; then
  echo "skip  nr.dist on GPUs (no mpirun or no libnr_dist.so in $B)"
  exit 0
fi
export NR_EMU_DEVICES=2 # rank r takes cuda:r (the local ranks inherit the environment)
MPIRUN=(env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NR_DIST_TEST_DEVICE=cuda timeout 300 mpirun
  --oversubscribe -x NR_THREADS=1 -x NR_DIST_TEST_DEVICE --mca btl self,vader --mca btl_vader_single_copy_mechanism none)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)
tmp="$(mktemp -d "${TMPDIR:-/tmp}/nr_emu_dist.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
dist_fail() { echo "FAIL  $1"; tail -n 30 "$tmp/out"; exit 1; }
"${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/gpu.lua > "$tmp/out" 2>&1 || dist_fail "tests/dist/gpu.lua"
n="$(grep -c '^PASS .* rank [01]/2$' "$tmp/out" || true)"
[ "$n" = 14 ] || dist_fail "tests/dist/gpu.lua: $n of 14 PASS lines"
grep 'max relative difference' "$tmp/out" | sed 's/^/      /'
echo "ok    nr.dist on 2 ranks' GPUs (tests/dist/gpu.lua: collectives, GradReducer vs 1 process)"
if "${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/failure.lua hang cuda > "$tmp/out" 2>&1; then dist_fail "failure.lua hang cuda succeeded"; fi
grep -q 'timed out after 3 s on rank 0 of 2 (NCCL communicator aborted)' "$tmp/out" ||
  dist_fail "failure.lua hang cuda: no NCCL timeout message"
grep -q 'rank 0: second collective after the abort (0\.[0-9] s): .*communicator of this rank was aborted after an earlier failure' "$tmp/out" ||
  dist_fail "failure.lua hang cuda: the collective still in flight did not fail at once after the abort"
echo "ok    a hung rank: NCCL's wait times out and aborts the communicator; the collective still in flight fails at once"
if NR_EMU_NCCL_FAIL=3 "${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/gpu.lua > "$tmp/out" 2>&1; then
  dist_fail "a failed NCCL transfer went unnoticed"
fi
grep -q 'nr.dist.allreduce (rank [01]/2).*NCCL reported unhandled system error .* on rank [01]' "$tmp/out" ||
  dist_fail "a failed NCCL transfer: no async-error message"
echo "ok    a failed NCCL transfer (NR_EMU_NCCL_FAIL): ncclCommGetAsyncError is reported and the job ends"
if NR_EMU_DEVICES=1 "${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/gpu.lua > "$tmp/out" 2>&1; then dist_fail "2 ranks on 1 GPU started"; fi
grep -q 'Duplicate GPU detected.*local rank 1 of 2 on this host, 1 GPU visible; NCCL needs one GPU per rank' "$tmp/out" ||
  dist_fail "2 ranks on 1 GPU: no clear error"
echo "ok    2 ranks on 1 GPU: nr.dist.init fails naming the GPU each rank took"
if [ -f "${NR_FASHION:-/usr/share/datasets/fashion-mnist}/train-images-idx3-ubyte.gz" ]; then
  NR_DIST_TEST_DEVICE=cuda NR_THREADS=1 "$B/nrlua" tests/dist/train.lua "$tmp/r1" 2 > "$tmp/out" 2>&1 ||
    dist_fail "train.lua on 1 process's GPU"
  "${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/train.lua "$tmp/r2" 2 > "$tmp/out" 2>&1 || dist_fail "train.lua on 2 ranks' GPUs"
  "$B/nrlua" tests/dist/compare_runs.lua "$tmp/r2" "$tmp/r1" 1e-5 > "$tmp/out" 2>&1 || dist_fail "compare_runs.lua"
  echo "ok    nr.train on 2 ranks' GPUs == 1 process: $(grep -o 'SAME.*' "$tmp/out")"
  "${MPIRUN[@]}" -np 2 "$B/nrlua" tests/dist/train_nr.lua "$tmp/nr" > "$tmp/out" 2>&1 || dist_fail "train_nr.lua on GPUs"
  grep -q 'RESULT ranks=2 rejuvenations=1' "$tmp/out" || dist_fail "train_nr.lua on GPUs: no rejuvenation"
  echo "ok    nr.train + Neural Rejuvenation on 2 ranks' GPUs: $(grep -o 'rejuvenations=1.*' "$tmp/out")"
else
  echo "skip  nr.train on GPUs (no Fashion-MNIST)"
fi
