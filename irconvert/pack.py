"""Stage 6, pack: weight signs into 32-bit words, scales into int8 exponents (or floats), thresholds.

Layout of a binary layer `L` in packed.safetensors (format "irconvert-packed/2"):

    L.weight.bits       int32 [out_channels, ceil(fan_in / 32)]
    L.weight.exp        int8  [out_channels]    2^exp = 2^g * s (the layer's gain times Libra-PB's scale),
                                                where every channel's scale is a power of two (IR-Net, SD-BNN, ...)
    L.weight.scale      float32 [out_channels]  the per-channel scale otherwise (trained scales: 2^g * alpha * beta)
    L.input.threshold   float32 [in_channels]   W1A1 only, where the method shifts the input (SD-BNN's ASD):
                                                the input bit is +1 where x >= threshold, else -1
    L.bias              as trained (float), if the layer has one

The layer computes y = scale (*) (B_w (*) B_a) + bias with B_a = sign(x - threshold) (sign(x) without
one). The method's own trained parameters (shifts, scales) are folded into these fields and not
stored again. Files of format /1 are /2 files without the optional fields.

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

from .fileformat import WORD_BITS  # noqa: F401  (re-exported)
from .layers import BinaryMixin


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


def store_scale(scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return {'exp': int8} if every per-channel scale is a power of two in int8 range, else {'scale': float32}."""
    mant, exp = torch.frexp(scale.float())
    e = exp.to(torch.int32) - 1  # frexp: scale = mant * 2^exp with mant in [0.5, 1)
    if bool((mant == 0.5).all()) and int(e.min()) >= -128 and int(e.max()) <= 127:
        return {"exp": e.to(torch.int8)}
    return {"scale": scale.float().contiguous()}


def pack_layer(module: BinaryMixin) -> dict[str, torch.Tensor]:
    """Return the packed tensors of one binary layer: 'bits', 'exp' or 'scale', and 'threshold' if it has one."""
    latent = module.latent_weight.detach()
    if module.binary_frozen:  # rebuilt from a packed file: the weight already is scale * B
        signs = torch.where(latent >= 0, 1.0, -1.0)
        scale = latent.abs().reshape(latent.shape[0], -1)[:, 0].float()
        threshold = getattr(module, "input_threshold", None)
    else:
        d = module.binarizer.deploy(module)
        signs, scale, threshold = d["signs"], d["scale"], d["threshold"]
    # a trained scale can turn negative: store -B with |scale|, the same weights, so scales are magnitudes
    neg = (scale < 0).reshape((-1,) + (1,) * (signs.dim() - 1))
    signs, scale = torch.where(neg, -signs, signs), scale.abs()
    out = {"bits": pack_signs(fan_in_order(signs.float())), **store_scale(scale)}
    if threshold is not None:
        out["threshold"] = threshold.float().contiguous()
    return out


def packed_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Return (tensors, layer metadata): binary weights packed, everything else as it is."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, BinaryMixin):
            continue
        del state[f"{name}.weight"]
        for extra in m.binary_params:  # folded into the bits, scale and threshold
            del state[f"{name}.{extra}"]
        p = pack_layer(m)
        state[f"{name}.weight.bits"] = p["bits"]
        for key in ("exp", "scale"):
            if key in p:
                state[f"{name}.weight.{key}"] = p[key]
        if "threshold" in p:
            state[f"{name}.input.threshold"] = p["threshold"]
        shape = list(m.latent_weight.shape)
        layers[name] = {"mode": m.binary_mode, "shape": shape, "fan_in": math.prod(shape[1:])}
    return state, layers


def binary_weight(bits: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the effective weight scale * B in the layer's own shape from packed bits and the per-channel
    scale (float32, or the int8 exponents of 2^exp)."""
    fan = math.prod(shape[1:])
    signs = from_fan_in_order(unpack_signs(bits, fan), tuple(shape))
    if not scale.is_floating_point():
        scale = torch.ldexp(torch.ones(shape[0]), scale.to(torch.int32))
    return signs * scale.float().reshape((-1,) + (1,) * (len(shape) - 1))
