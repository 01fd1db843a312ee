#!/usr/bin/env bash
# test.sh — installs, builds, and runs the whole test suite (C tests and busted specs via ctest).
# NR_SANITIZE=1 builds into build-asan with AddressSanitizer + UBSan and runs the suite there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${NR_SANITIZE:-0}" = 1 ]; then
  export NR_BUILD_DIR=build-asan
  export NR_CMAKE_ARGS="-DNR_SANITIZE=ON -DNR_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo ${NR_CMAKE_ARGS:-}"
  # LuaJIT's allocator and ASan's leak checker disagree at exit; leaks are checked in C tests.
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:allocator_may_return_null=1"   # (out-of-memory paths get NULL, as without ASan)
fi
./scripts/setup.sh
cd "${NR_BUILD_DIR:-build}"
ctest --output-on-failure -j 2 "$@"
