"""bench/layer_bench.py — PyTorch's side of bench/layer_bench.lua: best forward and backward ms of
each case in --cases (JSON list of {shape, module}, module a Python expression on torch.nn as nn),
training mode. Prints one JSON list of [forward ms, backward ms]."""
import argparse, json, time
import torch
import torch.nn as nn

ap = argparse.ArgumentParser()
ap.add_argument('--cases', required=True)
ap.add_argument('--reps', type=int, default=20)
ap.add_argument('--threads', type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
out = []
for case in json.load(open(a.cases)):
    torch.manual_seed(1)
    m = eval(case['module'], {'nn': nn})
    x = torch.randn(*case['shape'], requires_grad=True)
    g = torch.randn_like(m(x))
    m(x).backward(g)
    bf = bb = float('inf')
    for _ in range(a.reps):
        t0 = time.perf_counter()
        y = m(x)
        t1 = time.perf_counter()
        y.backward(g)
        bf, bb = min(bf, t1 - t0), min(bb, time.perf_counter() - t1)
    out.append([bf * 1e3, bb * 1e3])
print(json.dumps(out))
