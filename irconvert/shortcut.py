"""The Bi-Real shortcut (Liu et al., "Bi-Real Net", ECCV 2018), the structure IR-Net's ImageNet
models use: a real-valued shortcut around every binary conv and its BatchNorm,

    y = BN(conv(sign(x))) + S(x),

so the real-valued activations of one layer reach the next one although the conv sees only signs.
S is weight-free and fits every shape of 2-D conv (`bireal_shortcut` states its arithmetic exactly):

- space: where the conv has stride s > 1, an s x s average pool with stride s (ceil mode, padding
  not counted: Bi-Real's downsampling shortcut without its 1x1 conv); where that size still differs
  from the conv's output (a padding that does not keep the size, an even kernel, dilation), a
  centred crop or zero pad to it;
- channels: widening tiles the input channels (output channel o is input channel o mod C_in, as
  ReActNet-A's cat(x, x) for a ratio of 2); shrinking averages the input channels congruent modulo
  C_out (output channel o is the mean of input channels o, o + C_out, o + 2 C_out, ...: the adjoint
  of tiling, in the spirit of PokeBNN's reshape_add), groups of floor or ceil(C_in / C_out).

Files written before these shapes existed only hold convs whose S was pool-then-repeat with no crop,
which this S computes identically.

Gated form (`Policy.shortcut: gated`), for conversion of a pretrained model:

    y = BN(conv(sign(x))) + g * S(x),   g one learned factor per output channel, starting at 0,

so the converted model starts as the network the FP weights were trained for (a plain Bi-Real
shortcut adds a signal the pretrained BatchNorms never saw), and training opens each shortcut as
far as it helps, in the spirit of SkipInit/ReZero's zero-initialised residual gates. g is a
parameter of the BatchNorm (`L.shortcut_gate`), saved and exported with it.

Where a shortcut goes (`Policy.shortcut: auto`, the default) is the plan's decision (plan.py,
`auto_shortcuts`): around the W1A1 convs that have no real-valued path around them.

Mechanics: the conv keeps its real-valued input for the BatchNorm right after it, whose class
gains `ShortcutMixin` in front (state_dict keys do not change). The BatchNorm holds the conv as a
plain attribute, not a submodule, so it is neither saved nor traversed twice. For timm's
BatchNormAct2d the sum comes after the module's activation (the module's output).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def fits(conv: nn.Module) -> bool:
    """True if S(x) can match conv's output: any 2-D conv (S is defined for every shape of one)."""
    return isinstance(conv, nn.Conv2d)


def bireal_shortcut(x: torch.Tensor, stride: tuple[int, int], out_channels: int,
                    out_size: tuple[int, int]) -> torch.Tensor:
    """Return S(x) [N, out_channels, *out_size] of the conv input x [N, C_in, H, W], in x's dtype:

    1. stride (sh, sw) != (1, 1): avg_pool2d(x, (sh, sw), (sh, sw), ceil_mode=True,
       count_include_pad=False): each window's sum divided by the number of its elements inside x
       (the last row/column of windows may be partial), size (ceil(H / sh), ceil(W / sw));
    2. size (h, w) differs from out_size (H_o, W_o): per axis, d = H_o - h; d > 0 pads d // 2 zeros
       before and d - d // 2 after; d < 0 removes (-d) // 2 rows before and the rest after;
    3. C_out > C_in: channel o is channel o mod C_in (tile, then truncate);
       C_out < C_in: channel o is (x[o] + x[o + C_out] + x[o + 2 C_out] + ...) / n_o, summed left to
       right in x's dtype, n_o the number of terms (ceil(C_in / C_out) for o < C_in mod C_out, else
       floor(C_in / C_out)), one division per element.
    """
    if tuple(stride) != (1, 1):
        x = F.avg_pool2d(x, tuple(stride), tuple(stride), ceil_mode=True, count_include_pad=False)
    pads = []
    for have, want in ((x.shape[-1], out_size[1]), (x.shape[-2], out_size[0])):  # F.pad: last axis first
        d = want - have
        before = d // 2 if d >= 0 else -((-d) // 2)
        pads += [before, d - before]
    if any(pads):
        x = F.pad(x, pads)
    c_in = x.shape[1]
    if out_channels > c_in:
        x = x.repeat(1, -(-out_channels // c_in), 1, 1)[:, :out_channels]
    elif out_channels < c_in:
        total = x[:, :out_channels]
        for start in range(out_channels, c_in, out_channels):
            part = x[:, start:start + out_channels]
            n = part.shape[1]
            total = total + part if n == out_channels else torch.cat([total[:, :n] + part, total[:, n:]], 1)
        counts = torch.full((out_channels,), c_in // out_channels, dtype=x.dtype, device=x.device)
        counts[:c_in % out_channels] += 1
        x = total / counts.view(1, -1, 1, 1)
    return x


class ShortcutMixin:
    """Put in front of a BatchNorm class: adds S(x) of the binary conv feeding it (see module doc)."""

    def forward(self, input):
        out = super().forward(input)
        conv = self.bireal_conv
        x, conv.bireal_input = conv.bireal_input, None
        gate = self._parameters.get("shortcut_gate")
        s = bireal_shortcut(x, conv.stride, conv.out_channels, tuple(out.shape[-2:]))
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
