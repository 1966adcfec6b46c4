"""Hardtanh(-1, 1) that keeps its output, not its input, for the backward.

    forward:  y = hardtanh(x) = min(max(x, -1), 1)
    backward: dL/dx = dL/dy where -1 < x < 1, else 0   (PyTorch's hardtanh_backward)

-1 < x < 1 exactly where -1 < y < 1 (y = x there, y = +-1 or NaN elsewhere, as x), so the mask read
from y is the same, bit for bit: `hardtanh_backward(g, y)` is the gradient `hardtanh_backward(g, x)`
gives. Where a binary layer's sign follows, it keeps y anyway, so the Hardtanh costs no tensor of its
own; PyTorch's Hardtanh keeps x (its in-place variant a copy of x), a second activation-sized tensor
beside y after a residual sum, where FP's in-place ReLU keeps only its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _HardtanhOut(torch.autograd.Function):
    """hardtanh(x) forward; hardtanh_backward(g, y) backward from the output y."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = F.hardtanh(x, -1.0, 1.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, -1.0, 1.0)


class HardtanhKeepingOutput(nn.Hardtanh):
    """nn.Hardtanh(-1, 1) whose backward reads its output (the same gradient, one tensor fewer kept)."""

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not input.requires_grad:
            return super().forward(input)
        return _HardtanhOut.apply(input)
