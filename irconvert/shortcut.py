"""The Bi-Real shortcut (Liu et al., "Bi-Real Net", ECCV 2018), the structure IR-Net's ImageNet
models use: a real-valued shortcut around every binary conv and its BatchNorm,

    y = BN(conv(sign(x))) + S(x),

so the real-valued activations of one layer reach the next one although the conv sees only signs.
S is the identity where shapes agree; where the conv has stride s > 1, S average-pools x with an
s x s window (ceil mode, as Bi-Real's downsampling shortcut, without its 1x1 conv); where the conv
has k times more output than input channels, S repeats x k times along channels. Convs with other
shapes (fewer output channels, or a padding that does not keep the size) get no shortcut, and the
plan says how many were left out.

Gated form (`Policy.shortcut: gated`), for conversion of a pretrained model:

    y = BN(conv(sign(x))) + g * S(x),   g one learned factor per output channel, starting at 0,

so the converted model starts as the network the FP weights were trained for (a plain Bi-Real
shortcut adds a signal the pretrained BatchNorms never saw), and training opens each shortcut as
far as it helps, in the spirit of SkipInit/ReZero's zero-initialised residual gates. g is a
parameter of the BatchNorm (`L.shortcut_gate`), saved and exported with it.

Mechanics: the conv keeps its real-valued input for the BatchNorm right after it, whose class
gains `ShortcutMixin` in front (state_dict keys do not change). The BatchNorm holds the conv as a
plain attribute, not a submodule, so it is neither saved nor traversed twice.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def fits(conv: nn.Module) -> bool:
    """True if S(x) can match conv's output: 2-D, size-keeping padding, out channels a multiple of in."""
    if not isinstance(conv, nn.Conv2d) or conv.out_channels % conv.in_channels:
        return False
    if conv.padding == "same":
        return conv.stride == (1, 1)
    if isinstance(conv.padding, str):
        return False
    keeps = all(p == d * (k - 1) // 2 and k % 2 == 1 for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))
    return keeps and conv.stride[0] == conv.stride[1]


def bireal_shortcut(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Return S(x): x average-pooled by the conv's stride and repeated to its output channels."""
    s = conv.stride[0]
    if s > 1:
        x = F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)
    if conv.out_channels != conv.in_channels:
        x = x.repeat(1, conv.out_channels // conv.in_channels, 1, 1)
    return x


class ShortcutMixin:
    """Put in front of a BatchNorm class: adds S(x) of the binary conv feeding it (see module doc)."""

    def forward(self, input):
        out = super().forward(input)
        conv = self.bireal_conv
        x, conv.bireal_input = conv.bireal_input, None
        gate = self._parameters.get("shortcut_gate")
        s = bireal_shortcut(x, conv)
        return out + (s if gate is None else gate.to(s.dtype).view(1, -1, 1, 1) * s)


@functools.lru_cache(maxsize=None)
def shortcut_class(cls: type) -> type:
    """Return the version of norm class `cls` that adds the Bi-Real shortcut."""
    return type(f"Shortcut{cls.__name__}", (ShortcutMixin, cls), {"__doc__": ShortcutMixin.__doc__, "__module__": __name__})


def add_shortcut(conv: nn.Module, norm: nn.Module, gated: bool = False) -> None:
    """Give `norm` (the BatchNorm right after binary `conv`) the shortcut around both, in place
    (gated: times a per-channel factor that starts at 0)."""
    norm.__class__ = shortcut_class(type(norm))
    if gated:
        ref = conv._parameters["weight"]
        norm.shortcut_gate = nn.Parameter(torch.zeros(conv.out_channels, dtype=ref.dtype, device=ref.device))
    object.__setattr__(norm, "bireal_conv", conv)  # not a submodule: no second copy in the state_dict
    conv.bireal_keep_input = True
