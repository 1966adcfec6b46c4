"""LCE flatbuffer: file sizes next to packed.safetensors, and the x86 interpreter's time per image.

    python -m bench.tflite

The times are LCE's x86 build (the PyPI wheel's interpreter, one thread, batch 1), which runs portable
kernels for checking files: they are NOT the ARM figure (run lce_benchmark_model on the device for that).
Models: timm resnet18 at 224 (random init, default policy, calibrated on a random batch) and the
quickstart's ResNet-18 (shipped weights, the recipe's policy).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import irconvert
from bench.common import write_results
from irconvert.lce import KERNELS, run_tflite


def _row(name: str, b, size, folder: Path) -> dict:
    b.irconvert_input_size = size
    packed = irconvert.save_packed(b.eval(), folder / f"{name}.safetensors")
    tfl = irconvert.export_tflite(packed, folder / f"{name}.tflite")
    x = torch.randn((1,) + size, generator=torch.Generator().manual_seed(0)).permute(0, 2, 3, 1).numpy()
    out = run_tflite(tfl, x, repeat=10)
    row = {"model": name, "input": list(size), "packed_bytes": packed.stat().st_size,
           "tflite_bytes": tfl.stat().st_size, "ratio": tfl.stat().st_size / packed.stat().st_size}
    row.update({f"x86_ms_{k}": 1000 * float(out[k + "__seconds"]) for k in KERNELS})
    return row


def main() -> None:
    from irconvert.data import build_data, calibration_batch, data_info
    from irconvert.models import create_model
    from irconvert.run import build_model, recipe_for

    rows = []
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        fp = create_model("resnet18", "timm").eval()
        batch = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
        rows.append(_row("timm-resnet18", irconvert.binarize(fp, calibrate=batch), (3, 224, 224), folder))
        recipe = recipe_for(None, Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
        data = build_data(recipe.data)
        fp = build_model(recipe, data_info(recipe.data)).eval()
        b = irconvert.binarize(fp, recipe.binarize, calibrate=calibration_batch(data))
        rows.append(_row("quickstart-resnet18", b, (1, 28, 28), folder))
    lines = ["LCE flatbuffer vs packed.safetensors; x86 interpreter ms/image, 1 thread (not the ARM figure)", "",
             "| model | input | packed MiB | tflite MiB | ratio | x86 optimized | x86 reference | x86 indirect |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['packed_bytes'] / 2**20:.2f} | "
                     f"{r['tflite_bytes'] / 2**20:.2f} | {r['ratio']:.3f} | {r['x86_ms_optimized']:.1f} | "
                     f"{r['x86_ms_reference']:.1f} | {r['x86_ms_indirect']:.1f} |")
    write_results("tflite", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
