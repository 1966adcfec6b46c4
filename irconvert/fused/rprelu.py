"""ReActNet's RPReLU that keeps its output and a one-byte mask for the backward, not its input's copies.

    forward:  y = x - gamma;  o = y + zeta where y > 0, beta y + zeta elsewhere   (methods.react.RPReLU)
    backward: dL/dx     = g where y > 0, beta g elsewhere
              dL/dgamma = -sum dL/dx
              dL/dbeta  = sum over y <= 0 of g y,  y = (o - zeta) / beta there
              dL/dzeta  = sum g

Autograd keeps y (a float per element, for beta's gradient) and the mask y > 0 for the formula as
written. Here the output o is kept, which the binary layer's sign after it keeps anyway, so the
RPReLU costs only its mask; y on the negative side is recomputed from o. The forward is the same
ops, so the same numbers; dL/dx is the same, bit for bit (g, or g * beta); the parameter gradients
are the same sums in another order, and beta's reads y back to a rounding of o - zeta. That needs
beta != 0: with any beta <= 0 (a learned slope can cross 0) the plain formula runs instead, and
so it does on CUDA, where testing beta would wait for the device at every call (torch.compile
fuses the formula there), and inside torch.compile, whose partitioner decides what is kept.
"""

from __future__ import annotations

import torch

from .sign import binary_sign_grad, sign_values


class _RPReLUOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, zeta):
        y = x - gamma
        above = y > 0
        o = torch.where(above, y, y * beta) + zeta
        ctx.save_for_backward(o, above, gamma, beta, zeta)
        return o

    @staticmethod
    def backward(ctx, g):
        o, above, gamma, beta, zeta = ctx.saved_tensors
        gx = torch.where(above, g, g * beta)
        g_gamma = g_beta = g_zeta = None
        if ctx.needs_input_grad[1]:
            g_gamma = -gx.sum_to_size(gamma.shape)
        if ctx.needs_input_grad[2]:
            below = torch.where(above, 0.0, (o - zeta) / beta)
            g_beta = (g * below).sum_to_size(beta.shape)
        if ctx.needs_input_grad[3]:
            g_zeta = g.sum_to_size(zeta.shape)
        return gx if ctx.needs_input_grad[0] else None, g_gamma, g_beta, g_zeta


def rprelu_keeping_output(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                          zeta: torch.Tensor) -> torch.Tensor | None:
    """Return RPReLU(x) through the output-keeping function, or None where the plain formula must run."""
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling() or x.device.type != "cpu"
            or not (x.requires_grad or gamma.requires_grad or beta.requires_grad or zeta.requires_grad)
            or not bool((beta > 0).all())):
        return None
    return _RPReLUOut.apply(x, gamma, beta, zeta)


class _ShiftedSign(torch.autograd.Function):
    """RSign's B = sign(x - alpha) keeping x (and alpha), not the shifted copy: the backward shifts again."""

    @staticmethod
    def forward(ctx, x, alpha, tk, mode):
        ctx.save_for_backward(x, alpha, tk)
        ctx.mode = mode
        return sign_values(x - alpha)

    @staticmethod
    def backward(ctx, g):
        x, alpha, tk = ctx.saved_tensors
        gs = binary_sign_grad(g, x - alpha, tk, ctx.mode, False)
        g_alpha = -gs.sum_to_size(alpha.shape) if ctx.needs_input_grad[1] else None
        return gs if ctx.needs_input_grad[0] else None, g_alpha, None, None


def shifted_sign(x: torch.Tensor, alpha: torch.Tensor, tk: torch.Tensor | None, mode: str) -> torch.Tensor | None:
    """Return sign(x - alpha) (sign(0) = +1) with `mode`'s surrogate gradient, keeping x rather than x - alpha for
    the backward, or None where the caller's own ops must run (no grad, or inside torch.compile)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not (x.requires_grad or alpha.requires_grad):
        return None
    return _ShiftedSign.apply(x, alpha, tk, mode)
