"""Bitwise inference speed: the irconvert runtime's xor/popcount layers against fp32, in one run.

    python bench/runtime.py [--repeat N]

Cases: a 3x3 conv 256->256 on 14x14 (fp32 F.conv2d vs bitwise_conv2d), a 4096x4096 Linear
(F.linear vs bitwise_linear), at batch 1 and 8; and timm resnet18 (binarized with the default
policy, exported with save_packed, reloaded with irconvert.runtime.load) against the fp32 resnet18,
at 224x224, batch 1 and 8, with the share of the bitwise model's time left in full-precision layers
(stem conv, BatchNorm, pooling, classifier, residual adds). fp32 runs on torch's default threads,
the kernel on OpenMP with as many; the two are called alternately and each row is a median.
Writes bench/results/runtime.json and runtime.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

import irconvert
from irconvert.models import create_model
from irconvert.runtime import bench, kernels
from irconvert.write import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30, help="timed calls per layer case (models: a third)")
    args = parser.parse_args()
    if kernels.backend() != "native":
        print("warning: no compiled kernel, timing the PyTorch fallback", file=sys.stderr)

    rows = bench.layer_rows((1, 8), args.repeat)
    torch.manual_seed(0)
    model = irconvert.binarize(create_model("resnet18"))
    with tempfile.TemporaryDirectory() as tmp:
        path = irconvert.save_packed(model, Path(tmp) / "packed.safetensors")
        rows += bench.model_rows(path, (1, 8), (3, 224, 224), max(3, args.repeat // 3), case="timm resnet18 224x224")

    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, kernel {kernels.native_isa() or 'none'}"
    table = bench.markdown(rows) + f"\n\n{machine}; torch {torch.__version__}; medians of alternating runs.\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "runtime.json", json.dumps(rows, indent=2) + "\n")
    write_text(RESULTS / "runtime.md", table)
    print(table)


if __name__ == "__main__":
    main()
