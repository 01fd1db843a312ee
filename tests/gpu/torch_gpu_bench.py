#!/usr/bin/env python3
"""PyTorch side of the GPU training benchmark (tests/gpu/run.sh; nrlua side: bench/gpu_bench.lua).

Models, written out in plain torch.nn so they match nrlua's zoo layer for layer:
  mobilenet   MobileNet v1, width 0.25, 3x128x128, 1000 classes   (nr.models.mobilenet{width=0.25, input=128})
  resnet50    torchvision ResNet-50, 3x224x224, 1000 classes       (nr.models.resnet{depth=50})
  vgg19       CIFAR VGG-19 of Neural Rejuvenation: 16 conv3x3+BN+ReLU, max-pool after conv 4 and 10,
              GAP, linear; 3x32x32, 10 classes                     (nr.models.vgg{depth=19, dataset='cifar10'})
Step = zero_grad(set_to_none) + forward + cross_entropy + backward + SGD(momentum 0.9, wd 5e-4).
Synthetic fixed batch on the GPU (no data loading). torch.backends.cudnn.benchmark = True and
channels_last memory format, as asked; precision fp32 (PyTorch defaults: TF32 allowed for cuDNN
convolutions, not for matmuls) or bf16 (torch.autocast, fp32 master weights).
Timing: CUDA events around `--steps` steps after `--warmup` steps; images/s = batch * steps / time.
Writes {"env", "results", "complete"} to --json, again after each configuration (complete false
until the last), so a run stopped by run.sh's time limit still leaves the configurations it finished.
"""
import argparse
import json
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="mobilenet,resnet50,vgg19")
ap.add_argument("--precisions", default="fp32,bf16")
ap.add_argument("--warmup", type=int, default=8)
ap.add_argument("--steps", type=int, default=30)
ap.add_argument("--batch", default="mobilenet=256,resnet50=128,vgg19=128")
ap.add_argument("--json", required=True)
args = ap.parse_args()


def conv_bn_relu(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    CFG = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]

    def __init__(self, alpha=0.25, num_classes=1000):
        super().__init__()
        c = int(32 * alpha)
        layers = [conv_bn_relu(3, c, 3, stride=2)]
        for out, s in self.CFG:
            o = int(out * alpha)
            layers += [conv_bn_relu(c, c, 3, stride=s, groups=c), conv_bn_relu(c, o, 1)]
            c = o
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class VGG19NR(nn.Module):
    WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]

    def __init__(self, num_classes=10):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(self.WIDTHS, start=1):
            layers.append(conv_bn_relu(c, w, 3))
            c = w
            if i in (4, 10):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def resnet50():
    import torchvision
    return torchvision.models.resnet50(num_classes=1000)


MODELS = {
    "mobilenet": (lambda: MobileNetV1(0.25, 1000), (3, 128, 128), 1000),
    "resnet50": (resnet50, (3, 224, 224), 1000),
    "vgg19": (lambda: VGG19NR(10), (3, 32, 32), 10),
}


def bench(name, precision, batch):
    ctor, shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = ctor().cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, *shape, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        if precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    t_first = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t_first
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    return {"side": "pytorch", "model": name, "precision": precision, "batch": batch, "steps": args.steps,
            "images_per_s": batch * args.steps / (ms / 1000.0), "step_ms": ms / args.steps,
            "warmup_s": warm_s, "final_loss": float(loss), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    torch.backends.cudnn.benchmark = True
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    try:
        device = torch.cuda.get_device_name(0)
    except Exception as e:  # no usable GPU: every configuration below says why
        device = "none: " + repr(e)
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "device": device, "cudnn_benchmark": True, "channels_last": True,
           "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    out = []
    configs = [(n, p) for n in args.models.split(",") for p in args.precisions.split(",")]
    for i, (name, prec) in enumerate(configs):
        try:
            torch.cuda.reset_peak_memory_stats()
            r = bench(name, prec, int(batches[name]))
        except Exception as e:  # report and go on: one failure must not hide the others
            r = {"side": "pytorch", "model": name, "precision": prec, "error": repr(e)}
        print(json.dumps(r), flush=True)
        out.append(r)
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": out, "complete": i + 1 == len(configs)}, f, indent=1)
        try:
            torch.cuda.empty_cache()
        except Exception:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
