"""Primitives every stage shares: the one-bit sign, the facts about a conv/linear weight, and the
per-input-channel broadcast. General pieces, not any one paper's: the paper files import them.

    sign(x) = +1 if x >= 0 else -1       (sign(0) = +1, so that every value is one bit)
"""

from __future__ import annotations

import math

import torch
from torch import nn

SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def sign(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) in {-1, +1} with sign(0) = +1 (torch.sign would give 0, a third value)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def input_channels(layer: nn.Module) -> int:
    """Return a conv's in_channels or a linear layer's in_features."""
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def per_input_channel(v: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Return vector v [in channels] shaped to broadcast over layer input x (channels last for Linear)."""
    shape = (-1,) if isinstance(layer, nn.Linear) else (-1,) + (1,) * len(layer.kernel_size)
    return v.to(x.dtype).reshape(shape)


def fan_in(module: nn.Module) -> int:
    """Return the number of weights per output channel."""
    w = module._parameters["weight"]
    return int(w[0].numel())


def magnitude(module: nn.Module) -> int:
    """Return g = round(log2 std(weight)), the power of two nearest the weight's spread (0 if it has none)."""
    w = module._parameters["weight"].detach()
    std = float(w.float().std()) if w.numel() > 1 else 0.0
    return round(math.log2(std)) if math.isfinite(std) and std > 0 else 0


def is_depthwise(module: nn.Module) -> bool:
    """True for a conv with one input channel per group and more than one group."""
    groups = getattr(module, "groups", 1)
    return isinstance(module, nn.modules.conv._ConvNd) and groups > 1 and groups == module.in_channels
