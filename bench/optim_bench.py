"""bench/optim_bench.py — PyTorch's side of bench/optim_bench.lua: ms per optimizer step over the
parameter shapes in --shapes (JSON list of shapes), for SGD (momentum), Adam and AdamW, each with
PyTorch's single-tensor loop (foreach=False) and its multi-tensor path (foreach=True).
Prints one JSON object {name_loop: ms, name_foreach: ms}."""
import argparse, json, time
import torch

ap = argparse.ArgumentParser()
ap.add_argument('--shapes', required=True)
ap.add_argument('--steps', type=int, default=50)
ap.add_argument('--threads', type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
shapes = json.load(open(a.shapes))
params = [torch.randn(*s, requires_grad=True) for s in shapes]
for p in params:
    p.grad = torch.randn(*p.shape) * 1e-2
configs = {'sgd': (torch.optim.SGD, dict(lr=0.01, momentum=0.9, weight_decay=5e-4)),
           'adam': (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-4)),
           'adamw': (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}
out = {}
with torch.no_grad():
    for name, (cls, cfg) in configs.items():
        for mode, fe in (('loop', False), ('foreach', True)):
            o = cls(params, foreach=fe, **cfg)
            for _ in range(3):
                o.step()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                o.step()
            out[name + '_' + mode] = (time.perf_counter() - t0) / a.steps * 1e3
    # gradient clipping by the total 2-norm (its single-tensor and foreach paths)
    for mode, fe in (('loop', False), ('foreach', True)):
        kw = {'foreach': fe} if 'foreach' in torch.nn.utils.clip_grad_norm_.__code__.co_varnames else {}
        if mode == 'foreach' and not kw:
            continue  # (torch 1.13 has one path)
        for _ in range(3):
            torch.nn.utils.clip_grad_norm_(params, 1e9, **kw)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            torch.nn.utils.clip_grad_norm_(params, 1e9, **kw)
        out['clip_' + mode] = (time.perf_counter() - t0) / a.steps * 1e3
print(json.dumps(out))
