#!/usr/bin/env bash
# bench/run.sh — nrlua against PyTorch on this CPU, side by side, in one command.
#
#   bench/run.sh                       all models, 2 rounds, 2 threads
#   MODELS=fmnist_cnn,resnet18_cifar REPEATS=3 THREADS=2 CONV=im2col bench/run.sh
#
# Each round runs, per model and one process per run (so peak RSS is per model): nrlua
# (bench/bench.lua), PyTorch default (NCHW) and PyTorch --channels-last
# (../shared/bench/torch_baseline.py), with identical step settings; rounds repeat the sequence,
# so machine load lands on all three alike. Then bench/summarize.py prints, per model and batch:
# images/s of each side (median over rounds), the ratio nrlua / best PyTorch (best of default and
# channels_last in the same round; median and min..max over rounds; also from the best steps),
# peak RSS, nrlua's GFLOP/s and % of the measured sgemm peak, and the geometric means of the
# ratios. Writes bench/results/*.json (raw runs), STAMP_runs.txt (their list: re-summarize or pool
# sessions with bench/summarize.py A_runs.txt B_runs.txt), summary.json and summary.md.
# Env: NRLUA (default build-perf/nrlua, else build/nrlua), PYTHON (/usr/bin/python3), THREADS (2),
# REPEATS (2), MODELS (all four), CONV (nrlua's bench.lua --conv, default layers: the library's own choice), QUICK=1 (fewer
# steps). Big models (VGG, ResNet: seconds per step) use fewer steps than the small ones.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"
NRLUA=${NRLUA:-$( [ -x build-perf/nrlua ] && echo build-perf/nrlua || echo build/nrlua )}
PYTHON=${PYTHON:-/usr/bin/python3}
TORCH=${TORCH:-$root/../shared/bench/torch_baseline.py}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-2}
MODELS=${MODELS:-mobilenet_v1_025,vgg19_nr,resnet18_cifar,fmnist_cnn}
CONV=${CONV:-layers}
out=bench/results
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)

steps_for() { # model -> common step flags
   if [ "${QUICK:-0}" = 1 ]; then echo "--warmup 1 --min-steps 3 --max-steps 10 --min-time 0"; return; fi
   case "$1" in
      vgg19_nr|resnet18_cifar) echo "--warmup 1 --min-steps 4 --max-steps 20 --min-time 0" ;;
      *) echo "--warmup 2 --min-steps 8 --max-steps 60 --min-time 2" ;;
   esac
}

runs_file="$out/${stamp}_runs.txt"   # appended as runs finish: an interrupted session can still be summarized
: > "$runs_file"
for rep in $(seq 1 "$REPEATS"); do
   for m in ${MODELS//,/ }; do
      flags=$(steps_for "$m")
      echo "== round $rep/$REPEATS: $m ($(date -u +%H:%M:%S), load $(cut -d' ' -f1 /proc/loadavg))"
      f="$out/${stamp}_r${rep}_${m}_nrlua.json"
      NR_THREADS=$THREADS "$NRLUA" bench/bench.lua --threads "$THREADS" --models "$m" --conv "$CONV" $flags --json "$f" \
         | grep -E "train|infer" || true
      echo "nrlua:$rep:$m:$f" >> "$runs_file"
      for layout in default channels_last; do
         f="$out/${stamp}_r${rep}_${m}_torch_${layout}.json"
         extra=""
         [ "$layout" = channels_last ] && extra="--channels-last"
         "$PYTHON" "$TORCH" --threads "$THREADS" --models "$m" $extra $flags --json "$f" | grep -E "train|infer" \
            | sed "s/^/   [torch $layout]/" || true
         echo "torch_$layout:$rep:$m:$f" >> "$runs_file"
      done
   done
done

"$PYTHON" bench/summarize.py "$runs_file"
