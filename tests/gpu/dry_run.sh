#!/usr/bin/env bash
# dry_run.sh — runs tests/lua/cuda_spec.lua on a machine WITHOUT a GPU, with "cuda" mapped to the
# CPU and bfloat16 mapped to float32, so the spec's own Lua (helpers, argument order, the bf16
# branches, the nr.train run) is exercised before a scarce GPU session spends time on it.
#   tests/gpu/dry_run.sh [path/to/nrlua]        (default build-cuda/nrlua, else build/nrlua; the
#                                                nr.train test needs a build with the CUDA backend)
# ctest runs it as gpu/cuda_spec_dry_run, so a change to cuda_spec is checked in CI.
# How: patched copies of lua/nr/tensor.lua and lua/nr/cuda.lua go to a temporary folder that is
# searched first; nothing in the repository changes.
# What it is not: a GPU test. Every comparison is CPU against CPU, so passing says nothing about
# the CUDA kernels. Tests of GPU-only behaviour fail by construction and are listed as expected:
# device queries, named GPUs (cuda:N), the allocator cache and the copy stream's prefetch, errors that only the GPU raises (f32 product into a
# bf16 result, mixed activation dtypes, a CPU operand with a GPU destination, labels the caller
# vouched for that only the GPU leaves unchecked, a CPU destination for GPU bytes), the split of
# convolutions past cuDNN's element limit (its plans are counted), bf16 outputs,
# channels-last layer kernels (CPU kernels take contiguous activations only, and CPU layers
# convert), and SGD, whose "CPU" and "GPU" parameters become one tensor. Exit status 0 when only
# those fail.
set -uo pipefail
cd "$(dirname "$0")/../.."
NRLUA="${1:-}"
[ -z "$NRLUA" ] && { [ -x build-cuda/nrlua ] && NRLUA=build-cuda/nrlua || NRLUA=build/nrlua; }
D="$(mktemp -d /tmp/nrdry.XXXXXX)"
mkdir -p "$D/nr"
sed -e "s/^local function parse_device(dev, fname)$/&\n   if dev == 'cuda' or tostring(dev):match('^cuda:%d+$') then return C.NR_CPU end -- dry run/" \
    -e "s/^local function parse_dtype(dt, fname)$/&\n   if dt == 'bfloat16' or dt == 'bf16' then return C.NR_F32 end -- dry run/" \
    lua/nr/tensor.lua > "$D/nr/tensor.lua"
sed -e 's/^function M.available() .*/function M.available() return true end -- dry run/' \
    -e 's/^function M.device_count() .*/function M.device_count() return 1 end -- dry run/' \
    -e "s/^function M.synchronize() .*/function M.synchronize() end -- dry run/" \
    -e "s/^function M.set_device(i)$/&\n   if i == 0 then return end -- dry run/" \
    lua/nr/cuda.lua > "$D/nr/cuda.lua"
grep -q 'dry run' "$D/nr/tensor.lua" && [ "$(grep -c 'dry run' "$D/nr/cuda.lua")" = 4 ] ||
  { echo "dry_run.sh: could not patch tensor.lua / cuda.lua (their function headers changed?)"; exit 2; }
cat > "$D/run.lua" <<EOF
package.path = '$D/?.lua;' .. package.path
assert(loadfile('tests/gpu/spec_runner.lua'))('tests/lua/cuda_spec.lua')
EOF
"$NRLUA" "$D/run.lua" > "$D/log" 2>&1
EXPECTED='reports devices and memory|on a named GPU|prefetches on the copy stream|labels_checked skips the GPU label check|caches freed blocks|matmul mixes bf16|refuses mixed activation dtypes|sgd_step matches|sgd_step_many|surgery placement|keep the bf16 dtype|nhwc |keeps the format through every layer|refuses mixed memory formats|refuses a CPU destination for GPU bytes|past the per-call element limit'
# without a CUDA backend nr.train cannot pick device 'cuda' at all
"$NRLUA" -e 'os.exit(require("nr").cuda.built() and 0 or 1)' > /dev/null 2>&1 || EXPECTED="$EXPECTED|nr.train with precision|inside nr.train on the GPU|two runs from one seed|by a hook mid-epoch|profiler in sync mode|nr.train on the GPU copies uint8 batches"

grep -E '^(ok|FAIL) ' "$D/log" | sed -E "s/^FAIL  (.*($EXPECTED).*)/expected-fail  \1/"
unexpected="$(grep -E '^FAIL ' "$D/log" | grep -vE "$EXPECTED")"
tail -n 1 "$D/log"
if [ -n "$unexpected" ]; then
  echo "dry_run.sh: unexpected failures (details in $D/log):"; echo "$unexpected"; exit 1
fi
rm -rf "$D"
