#!/usr/bin/python3
"""bench/summarize.py — the table of a bench/run.sh session (nrlua against PyTorch, side by side).

usage: bench/summarize.py bench/results/STAMP_runs.txt [more _runs.txt files: their rounds are pooled]

Reads the raw JSON of every run listed (lines "side:round:model:path"; side is nrlua, torch_default
or torch_channels_last) and prints, per model, mode and batch: images/s of each side (median over
rounds of each run's median step), the ratio nrlua / best PyTorch layout, computed within each round
(median, min..max over rounds), the same ratio from each run's best step ("best": the least
disturbed step; on a shared machine load only ever slows a step down, so this is the robust
estimate), peak RSS of each side (one process per run; PyTorch: the better layout), nrlua's GFLOP/s
(6 x forward MACs per trained image, 2 x per inferred image) and its share of the sgemm peak (the
best 2048^3 sgemm the nrlua runs measured), the tensor allocations per timed step, and the
geometric means of the ratios. Writes bench/results/summary.md and summary.json.
Not a benchmark itself; no thresholds.
"""
import json
import math
import os
import statistics
import sys

paths = sys.argv[1:]
if not paths:
    sys.exit(__doc__)
out = os.path.dirname(paths[0]) or "."
runs = []
for p in paths:
    for line in open(p):
        if line.strip():
            side, rep, model, path = line.strip().split(":", 3)
            runs.append((side, f"{os.path.basename(p)}#{rep}", model, path))
data, sgemm = {}, []
for side, rep, model, path in runs:
    try:
        j = json.load(open(path))
        data[(side, rep, model)] = j["models"][model]
        if side == "nrlua" and j["env"].get("sgemm_gflops"):
            sgemm.append(j["env"]["sgemm_gflops"])
    except Exception as e:  # a failed run shows as missing
        print(f"missing {side} {rep} {model}: {e}")
peak = max(sgemm) if sgemm else float("nan")
reps = list(dict.fromkeys(r[1] for r in runs))
models = list(dict.fromkeys(r[2] for r in runs))


def geo(v):
    return math.exp(sum(map(math.log, v)) / len(v)) if v else float("nan")


rows, ratios, best_ratios = [], {"train": [], "infer": []}, {"train": [], "infer": []}
for model in models:
    for mode in ("train", "infer"):
        batches = set()
        for rep in reps:
            d = data.get(("nrlua", rep, model))
            if d:
                batches |= set(d[mode].keys())
        for b in sorted(batches, key=int):
            nr_ips, td, tc, rr, rb, gf, allocs, mon = [], [], [], [], [], [], [], []
            for rep in reps:
                try:
                    n = data[("nrlua", rep, model)][mode][b]
                    a = data[("torch_default", rep, model)][mode][b]
                    c = data[("torch_channels_last", rep, model)][mode][b]
                except KeyError:
                    continue
                nr_ips.append(n["img_per_s"]), td.append(a["img_per_s"]), tc.append(c["img_per_s"])
                rr.append(n["img_per_s"] / max(a["img_per_s"], c["img_per_s"]))
                rb.append(n["img_per_s_best"] / max(a["img_per_s_best"], c["img_per_s_best"]))
                gf.append(n.get("gflops", float("nan")))
                allocs.append(n.get("allocs_per_step", float("nan")))
                if n.get("nr_monitor") and n["nr_monitor"].get("l1_ms") is not None:
                    mon.append(100 * n["nr_monitor"]["l1_ms"] / (n["median_s"] * 1e3))
            if not rr:
                continue

            def mem(side):
                v = [data[(side, r, model)].get("peak_rss_mib") or 0 for r in reps if (side, r, model) in data]
                return max(v) if v else float("nan")

            row = {"model": model, "mode": mode, "batch": int(b), "rounds": len(rr),
                   "nrlua_img_s": statistics.median(nr_ips), "torch_default_img_s": statistics.median(td),
                   "torch_channels_last_img_s": statistics.median(tc),
                   "ratio": statistics.median(rr), "ratio_min": min(rr), "ratio_max": max(rr), "ratios": rr,
                   "ratio_best": statistics.median(rb), "ratios_best": rb,
                   "nrlua_rss_mib": mem("nrlua"), "torch_rss_mib": min(mem("torch_default"), mem("torch_channels_last")),
                   "nrlua_gflops": statistics.median(gf), "sgemm_peak_gflops": peak,
                   "allocs_per_step": max(allocs), "nr_l1_pct_of_step": statistics.median(mon) if mon else None}
            rows.append(row)
            ratios[mode].append(row["ratio"])
            best_ratios[mode].append(row["ratio_best"])
g = {k: geo(v) for k, v in ratios.items()}
gb = {k: geo(v) for k, v in best_ratios.items()}
lines = ["| model | mode | batch | nrlua img/s | torch img/s NCHW | torch img/s channels_last | ratio (min..max) | "
         "ratio of best steps | peak RSS MiB nrlua / torch | nrlua GFLOP/s (% sgemm peak) | allocs/step |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['nrlua_img_s']:.1f} | {r['torch_default_img_s']:.1f} | "
                 f"{r['torch_channels_last_img_s']:.1f} | {r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) | "
                 f"{r['ratio_best']:.2f} | {r['nrlua_rss_mib']:.0f} / {r['torch_rss_mib']:.0f} | "
                 f"{r['nrlua_gflops']:.1f} ({100 * r['nrlua_gflops'] / peak:.0f}%) | {r['allocs_per_step']:g} |")
lines.append("")
lines.append(f"geometric mean of ratios (median steps): train {g['train']:.2f}, inference {g['infer']:.2f}; "
             f"of best steps: train {gb['train']:.2f}, inference {gb['infer']:.2f}. Rounds: {len(reps)}; "
             f"sgemm peak {peak:.1f} GFLOP/s (2048^3 OpenBLAS, same threads, best seen). Ratio = nrlua / the "
             f"better PyTorch layout of the same round.")
table = "\n".join(lines)
print()
print(table)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"<!-- bench/summarize.py {' '.join(os.path.basename(p) for p in paths)} -->\n{table}\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"runs": paths, "rows": rows, "geomean": g, "geomean_best": gb, "sgemm_peak_gflops": peak}, f, indent=1)
