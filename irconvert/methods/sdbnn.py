"""SD-BNN, the Self-Distribution Binary Neural Network (Xue, Lu, Chang, Wei and Wei, 2021, arXiv:2103.02394).

Scaling factors change magnitudes, which the signs that a binary network computes with never see.
SD-BNN instead learns where each sign flips:

    Activation Self Distribution (ASD), per input channel c:    B_a = sign(a_c + d_a[c])
    Weight Self Distribution (WSD), per output channel o:       B_w = sign(w_o + d_w[o])
    y = B_w (*) B_a                                             (no scale; the BatchNorm after it rescales)

d_a and d_w are trained with the network (the sign's gradient passes to them unchanged, as to a and
w). Here both start at 0, so a converted model starts exactly where the plain sign leaves it.

Deployment: sign(a + d_a) = +1 exactly where a >= -d_a (IEEE addition is 0 only for a = -d_a), so
ASD is a per-channel threshold tau = -d_a on the input, stored in the packed file; WSD is folded into
the weight bits. Neither costs anything at inference beyond a compare with tau instead of 0.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import input_channels, per_input_channel


def add_shifts(layer: nn.Module, weight: torch.Tensor, w1a1: bool) -> tuple[str, ...]:
    """Register d_w [out] (and d_a [in channels] for W1A1) on `layer`, zero; return their names."""
    layer.weight_shift = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    if not w1a1:
        return ("weight_shift",)
    channels = input_channels(layer)
    layer.input_shift = nn.Parameter(torch.zeros(channels, dtype=weight.dtype, device=weight.device))
    return ("weight_shift", "input_shift")


def shift_weight(w: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Return w + d_w, one shift per output channel (WSD)."""
    return w + layer.weight_shift.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))


def shift_input(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Return a + d_a, one shift per input channel (ASD)."""
    return x + per_input_channel(layer.input_shift, x, layer)


def threshold(layer: nn.Module) -> torch.Tensor:
    """Return the deployment threshold tau = -d_a per input channel: B_a = +1 where a >= tau."""
    return -layer.input_shift.detach().float()


class SelfDistribution:
    """SD-BNN as a method part: learned shifts d_w (WSD) and, for W1A1, d_a (ASD), starting at 0."""

    def init(self, layer) -> tuple[str, ...]:
        names = super().init(layer)
        return names + add_shifts(layer, layer._parameters["weight"], layer.binary_mode == "W1A1")

    def shift_weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        return shift_weight(w, layer)

    def shift_input(self, x: torch.Tensor, layer) -> torch.Tensor:
        return shift_input(x, layer)

    def threshold(self, layer) -> Optional[torch.Tensor]:
        return threshold(layer) if layer.binary_mode == "W1A1" else None
