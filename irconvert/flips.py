"""The sign-flip rate of the binary weights: the share of weight signs that changed since the last look.

Helwegen et al., "Latent Weights Do Not Exist: Rethinking Binarized Neural Network Optimization",
NeurIPS 2019: what a binary network's optimizer does is flip signs, and the rate of flips is what
decides whether training settles. A converted model whose flip rate stays at tens of percent per
log is a chaotic conversion, visible in its first log lines instead of in its final accuracy.

    flip rate of layer l = #{i : B_l,i(now) != B_l,i(last look)} / #B_l
    overall              = sum_l #flips_l / sum_l #B_l

B is the sign the forward uses (`Binarizer.signs`, after Libra-PB's standardization and any shift).
The previous signs are kept as one bool per weight (a byte: 1/4 of the float latent weight), and
compared only when asked (`FlipMeter.rate`), at log points, never per step.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import binary_layers


@torch.no_grad()
def weight_signs(layer: nn.Module) -> torch.Tensor:
    """Return the layer's binary weight signs as bool (True: +1), as the forward uses them."""
    return layer.binarizer.signs(layer.latent_weight.detach(), layer) > 0


class FlipMeter:
    """Keeps the binary weight signs of a model's layers; `rate()` returns the flips since the last call."""

    def __init__(self, model: nn.Module):
        self.layers = [(n, m) for n, m in binary_layers(model) if not m.binary_frozen]
        self.last = {n: weight_signs(m) for n, m in self.layers}

    def rate(self) -> tuple[float, dict[str, float]]:
        """Return (overall share, {layer: share}) of the signs that changed since the last call (or since
        the meter was made), and remember the signs of now."""
        flips = total = 0
        per_layer = {}
        for name, m in self.layers:
            now = weight_signs(m)
            n = int((now != self.last[name]).sum())
            per_layer[name] = n / max(now.numel(), 1)
            flips, total = flips + n, total + now.numel()
            self.last[name] = now
        return flips / max(total, 1), per_layer
