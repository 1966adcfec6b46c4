"""Foundation figures: wall time of binarize(resnet50), and the training-step time of a binarized
vs full-precision timm resnet18 (forward + backward + SGD step, batch 32, 64x64), as a ratio in one run.

    python bench/foundation.py
"""

from __future__ import annotations

import platform
import time

import timm
import torch

import irconvert
from bench.common import median_time, write_results


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return median_time(step, repeat=15, warmup=3)


def main() -> None:
    torch.manual_seed(0)
    r50 = timm.create_model("resnet50")
    irconvert.binarize(r50)  # warm the import and tracer caches
    times = []
    for _ in range(5):
        t = time.perf_counter()
        irconvert.binarize(r50)
        times.append(time.perf_counter() - t)
    binarize_s = sorted(times)[len(times) // 2]

    fp = timm.create_model("resnet18", num_classes=10)
    binary = irconvert.binarize(fp)
    x, y = torch.randn(32, 3, 64, 64), torch.randint(0, 10, (32,))
    fp_s, bin_s = step_time(fp, x, y), step_time(binary, x, y)
    fp_s2 = step_time(fp, x, y)  # again, to show the noise of the machine
    rows = [
        {"case": "binarize(resnet50)", "seconds": round(binarize_s, 4), "goal": "< 1 s"},
        {"case": "train step resnet18 b32 64x64 fp32", "seconds": round(fp_s, 4), "repeat": round(fp_s2, 4)},
        {"case": "train step resnet18 b32 64x64 binary (W1A1)", "seconds": round(bin_s, 4)},
        {"case": "binary / fp32 step ratio", "ratio": round(bin_s / fp_s, 3), "goal": "<= 1.25"},
    ]
    table = "\n".join([
        f"Measured on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| measure | value | goal |",
        "|---|---|---|",
        f"| `binarize(resnet50)` wall time | {binarize_s:.3f} s | < 1 s |",
        f"| train step, resnet18 fp32 (b32, 64x64) | {1000 * fp_s:.1f} ms (again: {1000 * fp_s2:.1f} ms) | |",
        f"| train step, resnet18 binary W1A1 | {1000 * bin_s:.1f} ms | |",
        f"| binary / fp32 step time | {bin_s / fp_s:.2f}x | <= 1.25x |",
    ])
    write_results("foundation", rows, table)


if __name__ == "__main__":
    main()
