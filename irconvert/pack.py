"""Stage 6, pack: weight signs into 32-bit words, scales into int8 exponents.

Layout of a binary layer `L` in packed.safetensors (format "irconvert-packed/1"):

    L.weight.bits  int32 [out_channels, ceil(fan_in / 32)]
    L.weight.exp   int8  [out_channels]             2^exp = 2^g * s (the layer's gain times Libra-PB's scale)
    L.bias         as trained (float), if the layer has one

- The fan-in of output channel o is its weight row flattened in (kh, kw, c_in) order for convs
  (OHWI, the order of TFLite and Larq Compute Engine filters) and in c_in order for Linear.
- Word k holds elements 32k .. 32k+31 of the row; element 32k+j is bit j (least significant first).
- bit = 1 means -1, bit = 0 means +1 (sign(0) = +1 is bit 0).
- Unused bits of the last word are 0. A kernel that packs its activations the same way (zeros past
  the fan-in) gets dot = fan_in - 2 * popcount(a XOR w) with no masking.
- The true fan-in and the weight shape are in the file's metadata (`layers`).

LCE compatibility: for a conv whose c_in per group is a multiple of 32 (and for every Linear whose
in_features is) the words are exactly LCE's bitpacked OHWI filter (32-bit words along input
channels, bit = 1 for negative). For other c_in this layout packs densely across kernel positions,
where LCE pads every position to a whole word; a kernel repacks once at load.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .layers import BinaryMixin

WORD_BITS = 32


def fan_in_order(w: torch.Tensor) -> torch.Tensor:
    """Return w as [out, fan_in] with the fan-in in (kh, kw, c_in) order (OHWI) for convs."""
    if w.dim() > 2:
        w = w.permute(0, *range(2, w.dim()), 1)
    return w.reshape(w.shape[0], -1)


def from_fan_in_order(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of fan_in_order: [out, fan_in] back to the weight's own shape (OIHW)."""
    if len(shape) > 2:
        ohwi = (shape[0], *shape[2:], shape[1])
        w = rows.reshape(ohwi).permute(0, len(shape) - 1, *range(1, len(shape) - 1))
        # .contiguous() keeps odd strides on size-1 dims (a 1x1 kernel), which makes conv kernels
        # pick the channels-last path and round differently from the trained model
        return w.clone(memory_format=torch.contiguous_format)
    return rows.reshape(shape)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a [rows, n] tensor of +-1 into int32 [rows, ceil(n/32)]; bit j of word k = element 32k+j, 1 = -1."""
    rows, n = signs.shape
    words = math.ceil(n / WORD_BITS)
    bits = np.zeros((rows, words * WORD_BITS), dtype=bool)
    bits[:, :n] = (signs < 0).cpu().numpy()
    # one bit per weight all the way (a 64-bit integer per weight took ~10 s and GBs on VGG's fc)
    packed = np.packbits(bits, axis=1, bitorder="little").view("<i4")
    return torch.from_numpy(packed.astype(np.int32))


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Return float +-1 [rows, n] from int32 words packed by pack_signs."""
    as_bytes = packed.cpu().numpy().astype("<i4").view(np.uint8)
    bits = np.unpackbits(as_bytes, axis=1, count=n, bitorder="little")
    return 1.0 - 2.0 * torch.from_numpy(bits).to(torch.float32)


def pack_layer(module: BinaryMixin) -> dict[str, torch.Tensor]:
    """Return the packed tensors (bits, exp) of one binary layer, from its latent weight."""
    latent = module.latent_weight.detach()
    if module.binary_frozen:  # rebuilt from a packed file: the weight already is s * B
        signs = torch.where(latent >= 0, 1.0, -1.0)
        exp = torch.log2(latent.abs().reshape(latent.shape[0], -1)[:, 0]).round().to(torch.int32)
    else:
        signs = module.binarizer.signs(latent)
        exp = module.binarizer.exponent(latent) + module.binary_gain
    return {"bits": pack_signs(fan_in_order(signs.float())), "exp": exp.to(torch.int8)}


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Return (tensors, layer metadata): binary weights packed, everything else as it is."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, BinaryMixin):
            continue
        del state[f"{name}.weight"]
        p = pack_layer(m)
        state[f"{name}.weight.bits"], state[f"{name}.weight.exp"] = p["bits"], p["exp"]
        shape = list(m.latent_weight.shape)
        layers[name] = {"mode": m.binary_mode, "shape": shape, "fan_in": math.prod(shape[1:])}
    return state, layers


def binary_weight(bits: torch.Tensor, exp: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the effective weight s * B in the layer's own shape from packed bits and exponents."""
    fan = math.prod(shape[1:])
    signs = from_fan_in_order(unpack_signs(bits, fan), tuple(shape))
    s = torch.ldexp(torch.ones(shape[0]), exp.to(torch.int32)).reshape((-1,) + (1,) * (len(shape) - 1))
    return signs * s
