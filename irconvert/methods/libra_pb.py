"""Libra-PB as one op per layer: Q(w) = s * sign(w_hat), keeping only w and two numbers per channel.

IR-Net (Qin et al., CVPR 2020, Sec. 3.2), per output channel i over its fan-in of n weights:

    w_hat_i = (w_i - mu_i) * r_i,   mu_i = mean(w_i),  r_i = 1 / std(w_i) (unbiased; 0 for a constant channel)
    Q(w)_i  = s_i * sign(w_hat_i),  s_i = 2^round(log2 mean|w_hat_i|), detached

On the CPU both directions are one C++ kernel each (csrc/sign.cpp, built as fused/sign.py's kernel;
IRCONVERT_TRAIN_KERNELS chooses, as for the sign): per output channel the statistics, Q, and in the
backward the whole chain rule below, in two passes over a row that stays in cache, where PyTorch's
ops make about ten passes over every weight. Elsewhere (CUDA, or no compiler) the forward is
`libra.balance`, `libra.scale_exponent` and `sign`, the same ops in the same order, so Q is
bit-identical to the unfused code; the kernel gives the same Q (its float64 sums round to the same
floats but within ~1e-13 of a rounding boundary, see libra.balance_stats). The PyTorch backward
recomputes w_hat from w, mu and r (the same ops again, so the same bits) instead of keeping it and
the balancing's temporaries, several weight-sized tensors per layer, and applies the chain rule in
closed form (the kernel too, in float64 sums):

    g_hat = d(w_hat) * s * dL/dQ                       the sign's surrogate (EDE, STE, ...)
    dL/dw = r * (g_hat - mean(g_hat) - w_hat * sum(g_hat * w_hat) / (n - 1))

(the derivative of standardization; r = 0 makes a constant channel's gradient 0, as before).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..fused.sign import MODES, binary_sign_grad, kernel, sign_torch
from . import libra


@torch.library.custom_op("irconvert::libra_pb", mutates_args=())
def libra_pb_op(w: torch.Tensor, tk: Optional[torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor, torch.Tensor]:
    """Return (Q(w) in w's dtype, mu [O, 1], r [O, 1], s [O] float32); tk and mode shape the backward."""
    mod = _cpu_kernel(w)
    if mod is not None:
        q, mu, r, s = mod.libra_forward(_rows(w))
        return q.reshape(w.shape).to(w.dtype), mu, r, s
    flat, mu, r = libra.balance_stats(w)
    w_hat = (flat - mu) * r  # libra.balance
    s = libra.pow2(libra.scale_exponent(w_hat), w_hat)
    return (sign_torch(w_hat) * s).reshape(w.shape).to(w.dtype), mu, r, s.reshape(-1)


def _cpu_kernel(w: torch.Tensor):
    """Return the C++ kernel module for a CPU weight (None: PyTorch's ops)."""
    return kernel(w) if w.device.type == "cpu" and w.dtype != torch.float64 else None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).float().contiguous()


@libra_pb_op.register_fake
def _(w, tk, mode):
    o = w.shape[0]
    f32 = dict(dtype=torch.float32, device=w.device)
    return torch.empty_like(w), w.new_empty((o, 1), **f32), w.new_empty((o, 1), **f32), w.new_empty((o,), **f32)


def _setup(ctx, inputs, output) -> None:
    w, tk, mode = inputs
    _, mu, r, s = output
    ctx.save_for_backward(w, tk, mu, r, s)
    ctx.mode = mode
    ctx.mark_non_differentiable(mu, r, s)


# the backward runs over blocks of output channels of about this many weights: every step is per channel,
# and its weight-sized temporaries (w_hat, g, g_hat, products) are then block-sized, the peak of a backward
_BLOCK = 1 << 17


def _backward(ctx, grad_q, *_):
    w, tk, mu, r, s = ctx.saved_tensors
    if _cpu_kernel(w) is not None:
        return libra_pb_grad(w, grad_q, mu, r, s, tk, ctx.mode), None, None
    flat, g_q = w.reshape(w.shape[0], -1), grad_q.reshape(w.shape[0], -1)
    grad_w = torch.empty(flat.shape, dtype=torch.float32, device=w.device)
    rows = max(1, _BLOCK // max(flat.shape[1], 1))
    for i in range(0, flat.shape[0], rows):
        b = slice(i, i + rows)
        _block_grad(flat[b].float(), g_q[b].float(), mu[b], r[b], s[b], tk, ctx.mode, grad_w[b])
    return grad_w.reshape(w.shape).to(w.dtype), None, None


@torch.library.custom_op("irconvert::libra_pb_grad", mutates_args=())
def libra_pb_grad(w: torch.Tensor, grad_q: torch.Tensor, mu: torch.Tensor, r: torch.Tensor, s: torch.Tensor,
                  tk: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    """dL/dw of a CPU weight by the C++ kernel (its own op: inside a compiled backward t and k are data)."""
    t, k = (float(v) for v in tk.tolist()) if tk is not None else (0.0, 0.0)
    grad_w = _cpu_kernel(w).libra_backward(_rows(w), _rows(grad_q), mu, r, s, MODES.index(mode), t, k)
    return grad_w.reshape(w.shape).to(w.dtype)


@libra_pb_grad.register_fake
def _(w, grad_q, mu, r, s, tk, mode):
    return torch.empty_like(w)


def _block_grad(flat, g_q, mu, r, s, tk, mode: str, out: torch.Tensor) -> None:
    """Write dL/dw of a block of output channels into `out` (the chain rule of the module docstring)."""
    w_hat = (flat - mu).mul_(r)  # libra.balance's ops: the same w_hat, bit for bit
    g = g_q * s[:, None]
    g_hat = binary_sign_grad(g, w_hat, tk, mode)
    del g
    n = flat.shape[1]
    dot = (g_hat * w_hat).sum(dim=1, keepdim=True) / max(n - 1, 1)
    # r * (g_hat - mean(g_hat) - w_hat * dot): the same ops in the same order, in place
    torch.mul(g_hat.sub_(g_hat.mean(dim=1, keepdim=True)).sub_(w_hat.mul_(dot)), r, out=out)


libra_pb_op.register_autograd(_backward, setup_context=_setup)


def libra_pb(w: torch.Tensor, mode: str = "ede", tk: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return Libra-PB's Q(w) = 2^round(log2 mean|w_hat|) * sign(w_hat) per output channel, its
    gradient through sign by `mode`'s surrogate (tk = tensor [t, k] for EDE)."""
    return libra_pb_op(w, tk, mode)[0]
