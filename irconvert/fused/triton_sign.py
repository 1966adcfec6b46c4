"""Triton kernels of the binary sign and its surrogate gradients (the CUDA side of `fused.sign`).

    forward:  y = +1 where x >= 0, else -1
    backward: dL/dx = g * d(x), d = k t (1 - tanh^2(t x)) (EDE, written 4 k t e / (1 + e)^2 with
              e = exp(-2 |t x|), which never overflows), 1{|x| <= 1} (STE) or max(0, 2 - 2|x|) (ApproxSign);
              with CLIP (a fused Hardtanh(-1, 1) in front), 0 unless -1 < x < 1, as hardtanh_backward

One read of x (and g) and one write per element, math in float32, one rounding to the tensor's
dtype. EDE's t and k are read from a device tensor, so a t that changes every step launches the
same kernel and is no constant to a compiled graph. Importing this module imports triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 1024
MODES = {"ede": 0, "ste": 1, "approx": 2}


@triton.jit
def _sign_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside)
    y = tl.where(x >= 0, 1.0, -1.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_kernel(g_ptr, x_ptr, tk_ptr, out_ptr, n, MODE: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inside).to(tl.float32)
    if MODE == 0:
        t = tl.load(tk_ptr).to(tl.float32)
        k = tl.load(tk_ptr + 1).to(tl.float32)
        e = tl.exp(-2.0 * tl.abs(t * x))
        q = 1.0 + e
        out = g * (4.0 * k * t * e / (q * q))
    elif MODE == 1:
        out = g * tl.where(tl.abs(x) <= 1.0, 1.0, 0.0)
    else:
        d = 2.0 - 2.0 * tl.abs(x)
        out = g * tl.where(d < 0.0, 0.0, d)  # NaN stays NaN, as PyTorch's clamp
    if CLIP:
        out = tl.where((x > -1.0) & (x < 1.0), out, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


def sign_forward(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) in {-1, +1} (x dense; the result has x's layout)."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _sign_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK)
    return y


def sign_backward(g: torch.Tensor, x: torch.Tensor, tk: Optional[torch.Tensor], mode: str,
                  clip: bool = False) -> torch.Tensor:
    """Return g * d(x) for the surrogate `mode` (g and x dense, of one layout); tk = [t, k] for EDE; clip:
    0 unless -1 < x < 1."""
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _grad_kernel[(triton.cdiv(n, BLOCK),)](g, x, x if tk is None else tk, out, n, MODE=MODES[mode],
                                                  CLIP=bool(clip), BLOCK=BLOCK)
    return out
