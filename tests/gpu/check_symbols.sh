#!/usr/bin/env bash
# check_symbols.sh — lists nr_cuda_* functions the core C files call that the CUDA backend does not
# declare (core/cuda/cuda_internal.h, core/cuda/side.h for libnr_dist, or core/nr.h's cuda section) and,
# given a CUDA build's libnr.so, those it does not define. Run from anywhere; no GPU needed.
#   tests/gpu/check_symbols.sh [build-cuda/libnr.so]
# Exit status 0 when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
used="$(grep -ho 'nr_cuda_[a-z0-9_]*' core/*.c core/dist/*.c 2>/dev/null | sort -u)"
declared="$(grep -ho 'nr_cuda_[a-z0-9_]*' core/cuda/cuda_internal.h core/cuda/side.h core/nr.h | sort -u)"
missing="$(comm -23 <(echo "$used") <(echo "$declared"))"
rc=0
if [ -n "$missing" ]; then echo "called but not declared:"; echo "$missing"; rc=1; fi
if [ $# -ge 1 ]; then
  defined="$(nm -D --defined-only "$1" | grep -o 'nr_cuda_[a-z0-9_]*' | sort -u)"
  undef="$(comm -23 <(echo "$used") <(echo "$defined"))"
  if [ -n "$undef" ]; then echo "called but not defined in $1:"; echo "$undef"; rc=1; fi
fi
[ $rc = 0 ] && echo "check_symbols: every nr_cuda_* the core calls is declared${1:+ and defined in $1}"
exit $rc
