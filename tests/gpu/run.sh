#!/usr/bin/env bash
# run.sh — the GPU check, run as a whole on a GPU machine from the repository root, in under
# 9 minutes: the GPU-vs-CPU specs, then a training benchmark nrlua vs PyTorch on the same GPU, and
# a report in $OUT (report.md, specs.log, torch.json, torch.log, nrlua.jsonl, env.txt, profile_mobilenet_bf16.txt).
#   bash tests/gpu/run.sh            (needs build-cuda/gpu-pack.tar.xz or build/gpu-pack.tar.xz from
#                                     tests/gpu/pack.sh, or NR_GPU_PACK=path; OUT defaults to ./gpu-out)
#   NR_SPEC_FILTER='text|text' bash tests/gpu/run.sh   only the specs whose names contain a text
#   NR_GPU_BENCH=0 bash tests/gpu/run.sh                 the specs only (a rerun after a fix)
# Every phase has its own time limit (timeout -k: a TERM, then a KILL), so report.md is always written.
# What it assumes there: an NVIDIA driver for CUDA 13, python3 with PyTorch (cu13) and its pip
# packages nvidia-cublas / nvidia-cudnn-cu13, whose libcublas.so.13 / libcudnn.so.9 libnr loads.
# What it is not: a CI test (CI has no GPU; tests/lua/cuda_spec.lua skips itself there).
# Exit status: 0 when the specs passed (benchmark failures are reported, not fatal), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
PACK="${NR_GPU_PACK:-build-cuda/gpu-pack.tar.xz}"
# without NR_GPU_PACK: the newer of build-cuda's and build's packs
if [ -z "${NR_GPU_PACK:-}" ] && [ -f build/gpu-pack.tar.xz ] && { [ ! -f "$PACK" ] || [ build/gpu-pack.tar.xz -nt "$PACK" ]; }; then
  PACK=build/gpu-pack.tar.xz
fi
T="$(mktemp -d /tmp/nrgpu.XXXXXX)"
log() { echo "run.sh: $*" | tee -a "$OUT/env.txt"; }

if [ ! -f "$PACK" ]; then log "no $PACK: build with CUDA here, run tests/gpu/pack.sh, carry it"; exit 1; fi
tar -C "$T" -xJf "$PACK" || { log "cannot unpack $PACK"; exit 1; }
NRLUA="$T/nrgpu/bin/nrlua"

# cuDNN and cuBLAS from PyTorch's pip packages (nvidia/cudnn/lib, nvidia/cublas/lib or nvidia/cu13/lib),
# and NVRTC, which cuDNN 9 loads for its runtime-compiled engines (nvidia/cuda_nvrtc/lib or nvidia/cu13/lib)
NVLIB="$(python3 - <<'PY'
import importlib, os
dirs = []
for mod in ("nvidia.cudnn", "nvidia.cublas", "nvidia.cu13", "nvidia"):
    try:
        m = importlib.import_module(mod)
    except Exception:
        continue
    for base in list(getattr(m, "__path__", [])):
        for root, _, files in os.walk(base):
            if any(f.startswith(("libcudnn.so", "libcublas.so", "libcublasLt.so", "libnvrtc.so")) for f in files):
                dirs.append(root)
print(":".join(dict.fromkeys(dirs)))
PY
)"
export LD_LIBRARY_PATH="$T/nrgpu/lib${NVLIB:+:$NVLIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NRLUA_HOME="$ROOT" LUA_CPATH="$T/nrgpu/lua51/?.so;;" NR_THREADS="${NR_THREADS:-8}"

{
  echo "date: $(date -u +%FT%TZ)  commit: $(cat "$T/nrgpu/COMMIT" 2>/dev/null)"
  timeout -k 5 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "libnr dependencies not found:"; ldd "$T/nrgpu/bin/libnr.so" | grep 'not found' || echo "  (none)"
  # loaded against built-with library versions (a cuDNN older than the headers is not guaranteed)
  timeout -k 5 40 "$NRLUA" -e 'local nr = require "nr"; print("nrlua: cuda available", nr.cuda.available(), nr.cuda.device_name(0), nr.cuda.unavailable_reason())
    local v = nr.cuda.versions() or {}; print(string.format("versions: runtime %s driver %s cuDNN %s (built %s) cuBLAS %s (built %s)%s", v.runtime, v.driver, v.cudnn, v.cudnn_built, v.cublas, v.cublas_built, (v.cudnn or 0) < (v.cudnn_built or 0) and "  WARNING: cuDNN older than the build" or ""))
    if nr.cuda.available() then
      local ok, err = pcall(function() local t = nr.zeros({4}, {device = "cuda"}); assert(t:add(1):sum() == 4, "wrong sum") end)
      print("nrlua: kernel probe " .. (ok and "ok" or ("FAILED: " .. tostring(err))))
    end' 2>&1
  echo "nrlua probe exit status $?"
} >> "$OUT/env.txt"
cat "$OUT/env.txt"

# 0. nothing below can work when nrlua does not load or sees no GPU (libnr needs libcublas.so.13 and
#    libcudnn.so.9, and its static CUDA 13 runtime a driver >= 580): say so once, here, and stop
#    instead of failing every spec and benchmark for the same reason
if ! grep -qE '^nrlua: cuda available[[:space:]]+true' "$OUT/env.txt" || ! grep -q '^nrlua: kernel probe ok' "$OUT/env.txt"; then
  log "STOP: nrlua cannot use the GPU (see the nrlua lines above: a library not found, cudaGetDeviceCount's reason"
  log "  (cudaErrorInsufficientDriver: no driver, or one older than libnr's static CUDA 13 runtime needs, >= 580), or"
  log "  a first kernel that failed (cudaErrorNoKernelImageForDevice: libnr has sm_80 and sm_90 code only))"
  { echo "# nrlua GPU check"; echo; echo "STOPPED before the specs: nrlua cannot use the GPU."; echo; echo '```'
    cat "$OUT/env.txt"; echo '```'; } > "$OUT/report.md"
  rm -rf "$T"
  exit 1
fi

# 1. GPU against CPU, every kernel (tolerance in the spec's header). cuDNN's heuristics pick the
#    algorithms here (NR_CUDNN_FIND=0): the zoo has hundreds of conv shapes in four variants, and a
#    measured search for each would not fit the time; the benchmark below runs the searches.
#    A test after which the GPU no longer works (a sticky error: spec_runner.lua exits with 3) or
#    that crashed nrlua is rerun alone with CUDA_LAUNCH_BLOCKING=1 (each kernel's failure is
#    reported by its own launch check, naming the op; specs_blocking.log), then the specs resume
#    in a fresh process after it, all within the phase's 180 s.
: > "$OUT/specs.log"
SPEC_RCS="" AFTER="" SPEC_T0=$SECONDS RESUMES=0
while :; do
  left=$((180 - (SECONDS - SPEC_T0)))
  [ "$left" -ge 10 ] || { log "spec phase: out of time (180 s), the remaining tests did not run"; break; }
  NR_SPEC_AFTER="$AFTER" NR_SPEC_TRACE=1 NR_CUDNN_FIND=0 timeout -k 5 "$left" "$NRLUA" tests/gpu/spec_runner.lua \
    tests/lua/cuda_spec.lua 2>&1 | tee -a "$OUT/specs.log"
  rc=${PIPESTATUS[0]}
  SPEC_RCS="$SPEC_RCS $rc"
  # 3: the GPU broke after a test (its STICKY line); >= 128 but not timeout's 137: nrlua crashed in the last started test
  if [ "$rc" = 3 ]; then
    bad="$(grep '^STICKY  ' "$OUT/specs.log" | tail -n 1 | sed -E 's/^STICKY  //; s/: the GPU no longer works after this test .*//')"
  elif [ "$rc" -ge 128 ] && [ "$rc" != 137 ]; then
    bad="$(grep '^start ' "$OUT/specs.log" | tail -n 1 | sed 's/^start //')"
    echo "CRASH  $bad: nrlua died (exit status $rc) in this test" | tee -a "$OUT/specs.log"
  else
    break
  fi
  [ -n "$bad" ] && [ "$bad" != "$AFTER" ] || break
  RESUMES=$((RESUMES + 1))
  [ "$RESUMES" -le 4 ] || { log "spec phase: the GPU broke 5 times, no further resume (the rest did not run)"; break; }
  left=$((180 - (SECONDS - SPEC_T0)))
  if [ "$left" -ge 15 ]; then
    lim=$((left / 3 < 60 ? left / 3 : 60))
    { echo "== $bad alone, CUDA_LAUNCH_BLOCKING=1 (limit $lim s)"
      CUDA_LAUNCH_BLOCKING=1 NR_SPEC_FILTER="$bad" NR_CUDNN_FIND=0 timeout -k 5 "$lim" "$NRLUA" tests/gpu/spec_runner.lua \
        tests/lua/cuda_spec.lua 2>&1 | tail -n 60; } >> "$OUT/specs_blocking.log"
  fi
  AFTER="$bad"
done
SPEC_RC=0
for rc in $SPEC_RCS; do [ "$rc" = 0 ] || SPEC_RC=1; done
[ -z "$SPEC_RCS" ] && SPEC_RC=1
log "specs exit status $SPEC_RC (per run:$SPEC_RCS)"

# 2. benchmark: PyTorch (cudnn.benchmark, channels_last; fp32 and bf16 autocast) then nrlua (fp32 with
#    TF32 convs allowed as PyTorch's default, bf16 mixed precision (channels-last), and for
#    MobileNet once through nr.train and once bf16 in NCHW)
if [ "${NR_GPU_BENCH:-1}" = 0 ]; then
  log "NR_GPU_BENCH=0: no benchmark"
  rm -rf "$T"
  [ "$SPEC_RC" = 0 ]
  exit
fi
timeout -k 5 120 python3 tests/gpu/torch_gpu_bench.py --json "$OUT/torch.json" > "$OUT/torch.log" 2>&1
echo "torch_gpu_bench.py exit status $?" >> "$OUT/torch.log"
tail -n 20 "$OUT/torch.log"
: > "$OUT/nrlua.jsonl"
# bench LIMIT MODEL PRECISION [more gpu_bench.lua options]: one row of nrlua.jsonl; a run that ends
# without its JSON line (timed out, crashed) gets an error row with its exit status and last output
bench() {
  local lim=$1 m=$2 p=$3 outp
  shift 3
  outp="$(timeout -k 5 "$lim" "$NRLUA" bench/gpu_bench.lua --model "$m" --precision "$p" "$@" 2>&1)"
  local rc=$? last
  last="$(printf '%s\n' "$outp" | tail -n 1)"
  if [ "${last:0:1}" != "{" ]; then
    last="$(python3 -c 'import json, sys; print(json.dumps({"side": "nrlua", "model": sys.argv[1], "precision": sys.argv[2],
      "options": " ".join(sys.argv[5:]), "error": "exit status %s%s: %s" % (sys.argv[3], " (timed out)" if sys.argv[3] in ("124", "137") else "",
      sys.argv[4][-300:])}))' "$m" "$p" "$rc" "$(printf '%s\n' "$outp" | tail -n 3)" "$@")"
  fi
  printf '%s\n' "$last" | tee -a "$OUT/nrlua.jsonl"
}
for p in fp32 bf16; do
  for m in mobilenet resnet50 vgg19; do
    # time limits: the sum of every limit in this script (60 + 180 + 120 + 130 + 45 s) stays under 9 minutes
    lim=20; [ "$m" = resnet50 ] && lim=30; [ "$m" = vgg19 ] && lim=15
    bench "$lim" "$m" "$p" --tf32 1
  done
done
# the bf16 MobileNet steps again through nr.train (uint8 host batches prefetched on the copy stream,
# finished on the device)
bench 15 mobilenet bf16 --tf32 1 --trainer 1
bench 15 mobilenet bf16 --memory_format contiguous --tf32 1
# where a bf16 MobileNet step spends its GPU time, per layer (each layer waits for its kernels)
NR_PROFILE=sync timeout -k 5 15 "$NRLUA" bench/gpu_bench.lua --model mobilenet --precision bf16 --tf32 1 --warmup 2 --steps 5 \
  > "$OUT/profile_mobilenet_bf16.txt" 2>&1

# 3. report
python3 - "$OUT" "$SPEC_RC" <<'PY'
import json, os, sys
out, spec_rc = sys.argv[1], sys.argv[2]
torch = {"env": {}, "results": []}
try:
    torch = json.load(open(os.path.join(out, "torch.json")))
except Exception as e:
    torch["error"] = repr(e)
nrl = []
for line in open(os.path.join(out, "nrlua.jsonl")):
    try:
        nrl.append(json.loads(line))
    except Exception:
        nrl.append({"error": "unparsable line: " + line.strip()[:200]})
spec_lines = open(os.path.join(out, "specs.log")).read().splitlines()
n_ok = sum(1 for l in spec_lines if l.startswith("ok    "))
fails = [l[6:] for l in spec_lines if l.startswith("FAIL  ")]
L = ["# nrlua GPU check", "", "Specs (tests/lua/cuda_spec.lua, GPU vs CPU): exit status %s; %d ok, %d FAIL (details in specs.log)"
     % (spec_rc, n_ok, len(fails))]
L += ["- FAIL " + f for f in fails[:40]]
L += ["- " + l for l in spec_lines if l.startswith(("STICKY  ", "CRASH  "))]
L += ["- " + l for l in open(os.path.join(out, "env.txt")).read().splitlines() if l.startswith("run.sh: spec")]
# the last test started without a result line: where the phase hung or ended
done = {l[6:].rsplit(" (", 1)[0] for l in spec_lines if l.startswith("ok    ")} | set(fails)
started = [l[6:] for l in spec_lines if l.startswith("start ")]
if started and started[-1] not in done:
    L.append("- last test started, no result: " + started[-1])
if os.path.exists(os.path.join(out, "specs_blocking.log")):
    L.append("- rerun with CUDA_LAUNCH_BLOCKING=1 of the test that broke the GPU: specs_blocking.log")
L += ["", "PyTorch env: " + json.dumps(torch.get("env", {}))]
if "error" in torch or not torch.get("complete", True):
    L.append("PyTorch side: %s; last lines of torch.log: %s" % (torch.get("error", "incomplete (timed out?)"),
             " / ".join(open(os.path.join(out, "torch.log")).read().strip().splitlines()[-3:])))
L += ["",
     "| model | precision | side | batch | images/s | step ms | warm-up s | note |", "|---|---|---|---|---|---|---|---|"]
def row(r, side):
    note = r.get("error", "")
    if side == "nrlua":
        note = (note + " tf32=%s %s%s" % (r.get("tf32", ""), r.get("memory_format", ""),
                                          " nr.train (%s input)" % r.get("input", "float32") if r.get("trainer") else "")).strip()
    ips = r.get("images_per_s")
    L.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (r.get("model"), r.get("precision"), side, r.get("batch", ""),
             "%.0f" % ips if ips else "-", "%.1f" % r["step_ms"] if "step_ms" in r else "-",
             "%.1f" % r["warmup_s"] if "warmup_s" in r else "-", note))
for r in torch.get("results", []):
    row(r, "pytorch")
for r in nrl:
    row(r, "nrlua")
L += ["", "Ratios nrlua/PyTorch images/s, same precision (fp32: nrlua with TF32 convolutions, PyTorch with its"
      " defaults; bf16: nrlua mixed precision vs PyTorch autocast):"]
tp = {(r.get("model"), r.get("precision")): r.get("images_per_s") for r in torch.get("results", [])}
for r in nrl:
    t = tp.get((r.get("model"), r.get("precision")))
    if r.get("images_per_s") and t and str(r.get("tf32")) == "1":
        L.append("- %s %s %s%s: %.2f" % (r["model"], r["precision"], r.get("memory_format", ""),
                                         " (nr.train)" if r.get("trainer") else "", r["images_per_s"] / t))
open(os.path.join(out, "report.md"), "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
rm -rf "$T"
[ "$SPEC_RC" = 0 ]
