"""The straight-through sign of BinaryNet (Courbariaux/Hubara et al., 2016), vanilla baseline.

Forward: B = sign(x) with sign(0) = +1.
Backward: dL/dx = dL/dB * 1{|x| <= 1}  (the clipped straight-through estimator).
"""

from __future__ import annotations

import torch

from .ede import sign


class SteSign(torch.autograd.Function):
    """sign(x) forward, 1{|x| <= 1} backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * (x.abs() <= 1).to(grad_out.dtype)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) whose gradient is the clipped straight-through estimator."""
    return SteSign.apply(x)
