"""Libra-PB, the Libra Parameter Binarization of IR-Net (Qin et al., CVPR 2020, Sec. 3.2).

Per output channel i, over its fan-in (all weight dimensions but the first):
    w_hat_i = (w_i - mean(w_i)) / std(w_i)          balanced (zero mean) and standardized
    B_i     = sign(w_hat_i)                           maximal bit entropy: half +1, half -1
    s_i     = 2^round(log2(mean|w_hat_i|))            a power of two, detached from the graph
    Q(w)_i  = s_i * B_i
std is the unbiased estimate (torch.std), as in the authors' reference code.

Constant channel guard: where std(w_i) = 0 (a constant channel, or a fan-in of 1) the channel
carries no information after balancing; w_hat_i is set to 0, so B_i = +1 everywhere and s_i = 1
(exponent 0). No NaN or infinity can come out, in the forward or the backward.
"""

from __future__ import annotations

import functools

import torch

# The exponent is stored as int8 in the packed file; clamping keeps it there.
EXP_MIN, EXP_MAX = -64, 63


def balance(w: torch.Tensor) -> torch.Tensor:
    """Return w_hat = (w - mean) / std per output channel, 0 for constant channels."""
    flat, mean, inv = balance_stats(w)
    return ((flat - mean) * inv).reshape(w.shape)


def balance_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (w as [out, fan-in], float32 for half types, mean [out, 1], 1/std [out, 1] with 0 for constant
    channels): w_hat = (flat - mean) * inv, the ops `balance` runs (the fused op recomputes w_hat from these).

    The sums run in float64 and are rounded once to flat's dtype, so that the fused CPU op (csrc/sign.cpp),
    which sums in double in its own order, gives the same mean and std but where an exact sum lies within
    ~1e-13 of a float's rounding boundary; the rest is float arithmetic, op for op the same there."""
    flat = w.reshape(w.shape[0], -1)
    if flat.dtype in (torch.float16, torch.bfloat16):  # autocast or a half model: statistics in float32
        flat = flat.float()
    n = flat.shape[1]
    mean = (flat.sum(dim=1, keepdim=True, dtype=torch.float64) / n).to(flat.dtype)
    centered = flat - mean
    if n > 1:
        var = (centered.square().sum(dim=1, keepdim=True, dtype=torch.float64) / (n - 1)).to(flat.dtype)
    else:
        var = torch.zeros_like(centered[:, :1])
    # one per-channel factor (1/std, or 0 for a constant channel) keeps the weight-sized work to a
    # single multiply, as this runs in every forward pass; sqrt sees no 0, so no inf gradient
    ok = var > 0
    # in float64 and rounded once, as the C++ kernel: PyTorch's float sqrt need not be correctly rounded
    inv = (ok / torch.where(ok, var, torch.ones_like(var)).double().sqrt()).to(flat.dtype)
    return flat, mean, inv


def scale_exponent(w_hat: torch.Tensor) -> torch.Tensor:
    """Return e = round(log2(mean|w_hat|)) per output channel as int (0 where mean|w_hat| = 0).

    mean|w_hat| is a float64 sum rounded once to float32 (as balance_stats' sums), and its rounded log2 is
    exact: with m = f 2^x, f in [0.5, 1), round(log2 m) is x where f > 2^-1/2, else x - 1 (no float
    log2, whose last bit differs between libraries, decides it)."""
    flat = w_hat.detach().reshape(w_hat.shape[0], -1)
    m = (flat.abs().sum(dim=1, dtype=torch.float64) / flat.shape[1]).float()
    f, x = torch.frexp(m)
    e = torch.where(f > _BELOW_SQRT_HALF, x, x - 1)
    e = torch.where(m.isinf(), EXP_MAX, torch.where(m > 0, e, 0))  # 0 for 0 and NaN
    return e.clamp(EXP_MIN, EXP_MAX).to(torch.int32)


# the float32 just below 2^-1/2, which no float equals: f > it exactly where f > 2^-1/2
_BELOW_SQRT_HALF = float(torch.tensor(2**-0.5, dtype=torch.float32))


def pow2(exponent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return s = 2^exponent shaped to broadcast over the output-channel dimension of `like`."""
    s = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
    return s.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


class LibraPB:
    """Libra-PB as a method part: signs of w_hat, the detached power-of-two scale s.

    Where a method takes Libra-PB's weight path as it is (no shift, this scale, a weight sign the fused
    op knows), `weight` runs it as one op (libra_pb.py): the same bits, less memory and fewer passes."""

    def weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        mode = _fused_mode(type(self))
        if mode is None or w.dtype == torch.float64:
            return super().weight(w, layer)
        from .ede import mode_tk
        from .libra_pb import libra_pb

        return libra_pb(w, mode, mode_tk(layer, mode, w.device))

    def standardize(self, w: torch.Tensor, layer) -> torch.Tensor:
        return balance(w)

    def scale(self, w_hat: torch.Tensor, layer) -> torch.Tensor:
        return pow2(scale_exponent(w_hat), w_hat)

    def exponent(self, w: torch.Tensor) -> torch.Tensor:
        return scale_exponent(balance(w))

    def magnitude(self, layer) -> float:
        return 1.0  # w_hat has unit spread: the gain is not in it


@functools.lru_cache(maxsize=None)
def _fused_mode(cls) -> "str | None":
    """Return the fused sign mode of `cls`'s weight path if it is Libra-PB's own, else None (once per class:
    every forward of every layer asks)."""
    from .base import Binarizer, declared_mode

    if (cls.standardize is not LibraPB.standardize or cls.scale is not LibraPB.scale
            or cls.shift_weight is not Binarizer.shift_weight):
        return None
    return declared_mode(cls, "weight_sign")


def signs_times_scale(cls: type) -> bool:
    """True if `cls`'s weight is Libra-PB's fused op, s * (+-1) per output channel by construction."""
    return cls.weight is LibraPB.weight and _fused_mode(cls) is not None
