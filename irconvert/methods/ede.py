"""EDE, the Error Decay Estimator of IR-Net (Qin et al., CVPR 2020, Sec. 3.3).

Forward: B = sign(x) with sign(0) = +1, so that every value is one bit.
Backward: dL/dx = k * t * (1 - tanh^2(t * x)) * dL/dB, with
    t = 10^(log10 T_min + (log10 T_max - log10 T_min) * progress),  T_min = 1e-3, T_max = 10,
    k = max(1/t, 1),
progress running 0 -> 1 over training: early on the estimator is the identity (k*t = 1 near x = 0,
large support), late it approaches the true derivative of sign.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..fused import binary_sign
from ..ops import sign

T_MIN = 1e-3
T_MAX = 10.0


class EDESign(torch.autograd.Function):
    """sign(x) forward, k * t * (1 - tanh^2(t x)) backward (IR-Net Eq. 10-11)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: float, k: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.t, ctx.k = t, k
        return sign(x)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        th = x.mul(ctx.t).tanh_()
        # tanh_backward computes grad * (1 - th^2) in one pass; training time is dominated by such passes
        return torch.ops.aten.tanh_backward(grad_out, th).mul_(ctx.k * ctx.t), None, None


def ede_sign(x: torch.Tensor, t, k: "float | None" = None) -> torch.Tensor:
    """Return sign(x) whose gradient is EDE's k * t * (1 - tanh^2(t x)); t and k floats, or t a
    tensor [t, k] (a binary layer's `ede_tk`, data rather than a constant under torch.compile).

    Runs the fused op (irconvert.fused); `EDESign` above is the unfused reference it is tested against."""
    tk = t if isinstance(t, torch.Tensor) else torch.tensor([float(t), float(k)])
    return binary_sign(x, "ede", tk)


def ede_t(progress: float, t_min: float = T_MIN, t_max: float = T_MAX) -> float:
    """Return t = 10^(log10 t_min + (log10 t_max - log10 t_min) * progress), progress clamped to [0, 1]."""
    p = min(max(float(progress), 0.0), 1.0)
    lo, hi = math.log10(t_min), math.log10(t_max)
    return 10.0 ** (lo + (hi - lo) * p)


def ede_k(t: float) -> float:
    """Return k = max(1/t, 1)."""
    return max(1.0 / t, 1.0)


def layer_tk(layer, device=None) -> torch.Tensor:
    """Return the layer's [t, k] buffer (set_ede keeps it), else a tensor of its floats t and k."""
    tk = getattr(layer, "ede_tk", None)
    return tk if tk is not None else torch.tensor([float(layer.ede_t), float(layer.ede_k)], device=device)


def mode_tk(layer, mode: Optional[str], device=None) -> Optional[torch.Tensor]:
    """Return the [t, k] that a fused sign of `mode` reads: the layer's (layer_tk) for "ede", else None."""
    return layer_tk(layer, device) if mode == "ede" else None


class EDE:
    """EDE as a method part: both signs get k * t * (1 - tanh^2(t x)), with the layer's t and k."""

    weight_sign_mode = "ede"  # the fused sign's mode that weight_sign runs (see LibraPB.weight)
    input_sign_mode = "ede"  # and input_sign (see base.plain_input_mode)

    def weight_sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        return ede_sign(x, layer_tk(layer))

    def input_sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        return ede_sign(x, layer_tk(layer))
