"""Signs with fixed surrogate gradients: the straight-through sign of BinaryNet (Courbariaux/Hubara
et al., 2016), the vanilla baseline, and the ApproxSign of Bi-Real Net.

Forward: B = sign(x) with sign(0) = +1.
Backward: dL/dx = dL/dB * 1{|x| <= 1}         the clipped straight-through estimator (ste_sign)
          dL/dx = dL/dB * max(0, 2 - 2|x|)  ApproxSign, the derivative of a piecewise quadratic (approx_sign)
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


class ApproxSign(torch.autograd.Function):
    """sign(x) forward, max(0, 2 - 2|x|) backward (ApproxSign, Liu et al., Bi-Real Net, ECCV 2018)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * (2.0 - 2.0 * x.abs()).clamp_(min=0).to(grad_out.dtype)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) whose gradient is the triangle max(0, 2 - 2|x|)."""
    return ApproxSign.apply(x)
