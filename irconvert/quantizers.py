"""Signs with fixed surrogate gradients: the straight-through sign of BinaryNet (Courbariaux/Hubara
et al., 2016), the vanilla baseline, and the ApproxSign of Bi-Real Net.

Forward: B = sign(x) with sign(0) = +1.
Backward: dL/dx = dL/dB * 1{|x| <= 1}         the clipped straight-through estimator (ste_sign)
          dL/dx = dL/dB * max(0, 2 - 2|x|)  ApproxSign, the derivative of a piecewise quadratic (approx_sign)
"""

from __future__ import annotations

import torch

from .ops import sign


class SurrogateSign(torch.autograd.Function):
    """sign(x) forward, dL/dB * derivative(x) backward, for a fixed surrogate derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, derivative) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.derivative = derivative
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.derivative(x).to(grad_out.dtype), None


def clipped_identity(x: torch.Tensor) -> torch.Tensor:
    """1{|x| <= 1}, the clipped straight-through estimator's derivative (BinaryNet)."""
    return x.abs() <= 1


def triangle(x: torch.Tensor) -> torch.Tensor:
    """max(0, 2 - 2|x|), ApproxSign's derivative (Liu et al., Bi-Real Net, ECCV 2018)."""
    return (2.0 - 2.0 * x.abs()).clamp_(min=0)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) whose gradient is the clipped straight-through estimator."""
    return SurrogateSign.apply(x, clipped_identity)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) whose gradient is the triangle max(0, 2 - 2|x|)."""
    return SurrogateSign.apply(x, triangle)
