"""File sizes of packed.safetensors vs the fp32 model.safetensors, default policy, 1000 classes.

    python bench/sizes.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import timm
from safetensors.torch import load_file, save_file

import irconvert
from bench.common import write_results

MODELS = ["resnet18", "resnet34", "mobilenetv2_100", "vit_tiny_patch16_224"]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in MODELS:
            fp = timm.create_model(name)
            fp32 = Path(d) / f"{name}-fp32.safetensors"
            save_file({k: v.contiguous() for k, v in fp.state_dict().items()}, str(fp32))
            b = irconvert.binarize(fp)
            packed = irconvert.save_packed(b, Path(d) / f"{name}-packed.safetensors")
            tensors = load_file(packed)
            # every binary layer: exactly ceil(fan_in / 32) words per output channel, one exponent each
            exact = all(
                tensors[f"{n}.weight.bits"].shape == (m.latent_weight.shape[0], math.ceil(m.latent_weight[0].numel() / 32))
                and tensors[f"{n}.weight.exp"].numel() == m.latent_weight.shape[0]
                for n, m in irconvert.binary_layers(b))
            fp_mb, pk_mb = fp32.stat().st_size / 2**20, packed.stat().st_size / 2**20
            n_bin = len(list(irconvert.binary_layers(b)))
            rows.append({"model": name, "fp32_mib": round(fp_mb, 3), "packed_mib": round(pk_mb, 3),
                         "ratio": round(pk_mb / fp_mb, 4), "binary_layers": n_bin, "words_exact": exact})
    lines = ["| model | fp32 safetensors | packed | packed / fp32 | binary layers | words = ceil(fan_in/32) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fp32_mib']:.2f} MiB | {r['packed_mib']:.2f} MiB | 1/{1 / r['ratio']:.1f} "
                     f"({r['ratio']:.3f}) | {r['binary_layers']} | {'yes' if r['words_exact'] else 'NO'} |")
    write_results("sizes", rows, "\n".join(lines))


if __name__ == "__main__":
    main()
