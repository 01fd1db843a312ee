#!/usr/bin/env bash
# spec_runner_selftest.sh — checks tests/gpu/spec_runner.lua's handling of a test that breaks the GPU,
# without a GPU: a fake spec makes nr.cuda claim a GPU, so the runner's probe after a failure
# (a tiny tensor on 'cuda') fails as it would after a sticky CUDA error.
#   tests/gpu/spec_runner_selftest.sh [path/to/nrlua]
# Checks: 'start' lines (NR_SPEC_TRACE=1), the STICKY line and exit status 3 with no later test run,
# then a resume with NR_SPEC_AFTER that runs only the tests after the broken one. ctest runs it as
# gpu/spec_runner_selftest (tests/gpu/run.sh relies on this behaviour on the GPU machine).
set -uo pipefail
cd "$(dirname "$0")/../.."
NRLUA="${1:-build/nrlua}"
D="$(mktemp -d /tmp/nrrunner.XXXXXX)"
cat > "$D/fake_spec.lua" <<'LUA'
local nr = require 'nr'
describe('fake', function()
   it('first', function() end)
   it('second breaks the GPU', function()
      if os.getenv('FAKE_BREAK') == '1' then
         nr.cuda.available = function() return true end -- the probe now needs a GPU
         nr.cuda.synchronize = function() end
      end
      error('an illegal memory access was encountered')
   end)
   it('third', function() end)
end)
LUA
fail() { echo "spec_runner_selftest: $*"; echo "--- output:"; cat "$D/out"; exit 1; }
# 1. a failure that leaves the GPU usable (no GPU here: the probe is skipped): the run goes on
NR_SPEC_TRACE=1 "$NRLUA" tests/gpu/spec_runner.lua "$D/fake_spec.lua" > "$D/out" 2>&1
rc=$?
[ "$rc" = 1 ] || fail "a plain failure should exit with 1, got $rc"
grep -q '^start fake second breaks the GPU$' "$D/out" || fail "no start line"
grep -q '^ok    fake third' "$D/out" || fail "the test after a plain failure did not run"
grep -q '^STICKY' "$D/out" && fail "STICKY without a broken GPU"
# 2. the probe fails after the second test: STICKY, exit 3, the third does not run
FAKE_BREAK=1 "$NRLUA" tests/gpu/spec_runner.lua "$D/fake_spec.lua" > "$D/out" 2>&1
rc=$?
[ "$rc" = 3 ] || fail "a broken GPU should exit with 3, got $rc"
grep -q '^STICKY  fake second breaks the GPU: the GPU no longer works' "$D/out" || fail "no STICKY line"
grep -q 'fake third' "$D/out" && fail "a test ran after the GPU broke"
grep -q '1 not run (after the GPU broke)' "$D/out" || fail "the summary does not count the test not run"
# 3. the resume after it runs the third test only
NR_SPEC_AFTER='fake second breaks the GPU' "$NRLUA" tests/gpu/spec_runner.lua "$D/fake_spec.lua" > "$D/out" 2>&1
rc=$?
[ "$rc" = 0 ] || fail "the resumed run should pass, got $rc"
grep -q '^ok    fake third' "$D/out" || fail "the resumed run did not run the third test"
grep -qE '^(ok|FAIL)  +fake (first|second)' "$D/out" && fail "the resumed run repeated a test before the resume point"
# 4. a resume point that names no test is an error, not a silent empty run
NR_SPEC_AFTER='no such test' "$NRLUA" tests/gpu/spec_runner.lua "$D/fake_spec.lua" > "$D/out" 2>&1
[ $? = 1 ] && grep -q 'names no test' "$D/out" || fail "an unknown NR_SPEC_AFTER was accepted"
rm -rf "$D"
echo "spec_runner_selftest: ok"
