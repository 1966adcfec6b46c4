"""Bitwise inference speed: the irconvert runtime's xor/popcount layers against fp32, in one run.

    python -m bench.runtime [--repeat N] [--quick]

Per-layer cases: a 3x3 conv 256->256 on 14x14 (fp32 F.conv2d vs bitwise_conv2d) and a 4096x4096
Linear (F.linear vs bitwise_linear), at batch 1 and 8. Whole models (binarized with the default
policy, exported with save_packed, reloaded with irconvert.runtime.load, which fuses BatchNorm,
residual sums and Hardtanh into the bitwise convs and chains them in packed bits) against the same
fp32 architecture: timm resnet18 and resnet34 at 224x224, batch 1 and 8, on 1 and 2 threads;
mobilenetv2_100 (depthwise convs kept float) and vit_tiny_patch16_224 at batch 1, 2 threads; and
resnet18 with fuse=False (the runtime before fusion) for comparison. Each row alternates fp32 and
bitwise call by call and reports medians, with the share of the bitwise model's time spent outside
its bitwise layers. The op-kind profile (time per op kind, node by node through the torch.fx
graph) shows where the time goes in fp32, in the unfused and in the fused runtime.
Writes bench/results/runtime.json and runtime.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

import irconvert
from irconvert.models import create_model
from irconvert.runtime import bench, kernels

from .common import write_results


# (timm name, batches, threads, extra create_model kwargs)
MODELS = [
    ("resnet18", (1, 8), (1, 2), {}),
    ("resnet34", (1, 8), (1, 2), {}),
    ("mobilenetv2_100", (1,), (2,), {}),
    ("vit_tiny_patch16_224", (1,), (2,), {}),
]


def _packed(name: str, tmp: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    return irconvert.save_packed(irconvert.binarize(create_model(name, **kwargs)), tmp / f"{name}.safetensors")


def model_rows(repeat: int, quick: bool) -> list[dict]:
    """Whole-model rows; `quick` keeps batch 1 on 2 threads."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, batches, threads, kwargs in MODELS:
            path = _packed(name, Path(tmp), **kwargs)
            if quick:
                batches, threads = (1,), (2,)
            for b in batches:
                reps = repeat if b == 1 else max(3, repeat // 3)
                rows += bench.model_rows(path, (b,), (3, 224, 224), reps, case=f"timm {name} 224x224",
                                         threads=threads)
            if name == "resnet18":
                rows += bench.model_rows(path, (1,), (3, 224, 224), repeat, threads=(2,), fuse=False,
                                         case="timm resnet18 224x224, unfused (before)")
    return rows


def profile(threads: int = 2) -> str:
    """The op-kind table of resnet18 at batch 1: fp32, the runtime unfused, the runtime fused."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _packed("resnet18", Path(tmp))
            x = torch.randn(1, 3, 224, 224)
            cols = {"fp32": bench.op_shares(create_model("resnet18").eval(), x),
                    "bitwise, unfused": bench.op_shares(irconvert.runtime.load(path, fuse=False), x),
                    "bitwise, fused": bench.op_shares(irconvert.runtime.load(path), x)}
    finally:
        torch.set_num_threads(before)
    return bench.shares_markdown(cols)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per layer case (models: a third)")
    parser.add_argument("--quick", action="store_true", help="models at batch 1 on 2 threads only")
    args = parser.parse_args()
    if kernels.backend() != "native":
        print("warning: no compiled kernel, timing the PyTorch fallback", file=sys.stderr)

    torch.set_num_threads(2)
    rows = bench.layer_rows((1, 8), args.repeat)
    rows += model_rows(max(5, args.repeat // 3), args.quick)
    prof = profile()

    machine = f"{platform.machine()}, kernel {kernels.native_isa() or 'none'}"
    table = (bench.markdown(rows) + f"\n\n{machine}; torch {torch.__version__}; medians of alternating runs; "
             "full-precision share = the bitwise model's time outside its bitwise layers.\n\n"
             "Time per op kind, timm resnet18 224x224, batch 1, 2 threads (node by node through the torch.fx graph):\n\n"
             + prof + "\n")
    write_results("runtime", rows, table)


if __name__ == "__main__":
    main()
