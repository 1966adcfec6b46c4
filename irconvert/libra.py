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

import torch

# The exponent is stored as int8 in the packed file; clamping keeps it there.
EXP_MIN, EXP_MAX = -64, 63


def balance(w: torch.Tensor) -> torch.Tensor:
    """Return w_hat = (w - mean) / std per output channel, 0 for constant channels."""
    flat = w.reshape(w.shape[0], -1).float()
    centered = flat - flat.mean(dim=1, keepdim=True)
    if flat.shape[1] > 1:
        std = centered.std(dim=1, keepdim=True)
    else:
        std = torch.zeros_like(centered)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    w_hat = torch.where(std > 0, centered / safe, torch.zeros_like(centered))
    return w_hat.reshape(w.shape)


def scale_exponent(w_hat: torch.Tensor) -> torch.Tensor:
    """Return e = round(log2(mean|w_hat|)) per output channel as int (0 where mean|w_hat| = 0)."""
    m = w_hat.detach().reshape(w_hat.shape[0], -1).abs().mean(dim=1)
    e = torch.where(m > 0, torch.log2(torch.where(m > 0, m, torch.ones_like(m))).round(), torch.zeros_like(m))
    return e.clamp(EXP_MIN, EXP_MAX).to(torch.int32)


def pow2(exponent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Return s = 2^exponent shaped to broadcast over the output-channel dimension of `like`."""
    s = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)
    return s.to(like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
