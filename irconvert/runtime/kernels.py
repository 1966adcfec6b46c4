"""The bitwise kernels: the compiled one (JIT-built from irconvert/csrc/bitwise.cpp) and its pure-PyTorch twin.

Both compute, for W1A1 layers with the weight s * B (s = 2^exp per output channel) and the input
signs B_a = sign(x), sign(0) = +1:

    conv2d:  y[n, o, p] = s_o * (n_valid(p) * C_g - 2 * popcount(patch(p) xor w_o)) + b_o
    linear:  y[n, o]    = s_o * (F - 2 * popcount(x_n xor w_o)) + b_o

over 64-bit words with bit 1 = -1, channels of a pixel along the word (NHWC bit-packed), zeros in
the unused bits of both operands. Zero padding is exact: n_valid(p) counts the kernel taps inside
the image and padded taps contribute nothing. The integer dot times a power of two is exact in
float32, so the only rounding is the bias add. Against the float simulation (load_packed) that
makes a layer without bias bit-identical (float32 sums +-2^exp exactly too), and so a whole ResNet,
whose binary convs have none; with a bias the result is the exact value rounded once, where
PyTorch's float32 conv may also round partial sums holding the bias: a few ulp apart, within
1e-6 * (|b| + s * fan_in) (tests/test_runtime.py checks both).

conv2d_ex is the conv with the fused output transform of runtime/fuse.py: y = fma(dot, alpha, beta)
(a folded BatchNorm; one rounding, as torch's BatchNorm), plus a residual, clamped, written as float
and/or as packed sign bits [N, OH, OW, ceil(O/64)] (by !(y >= 0) or by an integer threshold on dot),
reading float or packed input; `pack` packs a float tensor once for several readers;
`affine_maxpool` is a BatchNorm + clamp + max-pool in one pass (the ResNet stem). The fallback
rounds fma exactly too (fma32: a double sum rounded to odd, then to float32).

Which implementation runs is read from the environment variable IRCONVERT_RUNTIME on each call:
    auto (default)  the compiled kernel; if it cannot be built, the PyTorch one, with one warning
    native          the compiled kernel, or an IRConvertError saying why it cannot be built
    python          the PyTorch one (slow; for machines without a C++ compiler and for tests)
The compiled kernel is built once per source, torch version and CPU into IRCONVERT_CACHE (default
~/.cache/irconvert), with -O3 -march=$IRCONVERT_MARCH (default native) and OpenMP, and runs on
torch.get_num_threads() threads, or on one for a layer under ~0.5M word operations (a 4096x4096
Linear at batch 1), where a second thread costs more than it saves.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import IRConvertError
from ..native import build as _build

ENV_BACKEND = "IRCONVERT_RUNTIME"
BACKENDS = ("auto", "native", "python")
WORD = 64
LANES = 8  # linear output channels per weight block: word k of 8 channels is one 512-bit vector
_MASKS = (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F)


def backend() -> str:
    """Return the implementation that runs now: 'native' or 'python' (building the kernel if needed)."""
    want = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if want not in BACKENDS:
        raise IRConvertError(f"{ENV_BACKEND}={want!r}: choose one of {', '.join(BACKENDS)}")
    if want == "python":
        return "python"
    ext, why = _build(os.environ.get("IRCONVERT_MARCH", "native"))
    if ext is not None:
        return "native"
    if want == "native":
        raise IRConvertError(f"{ENV_BACKEND}=native: the bitwise kernel could not be built ({why}); "
                             "install a C++ compiler (g++) and ninja, or unset it to use the PyTorch fallback")
    _warn_fallback(why)
    return "python"


@functools.lru_cache(maxsize=None)
def _warn_fallback(why: str) -> None:
    warnings.warn(f"irconvert.runtime: the compiled bitwise kernel is unavailable ({why}); using the "
                  "PyTorch fallback, which is exact but slow", RuntimeWarning, stacklevel=3)


def native_isa() -> Optional[str]:
    """Return the instruction set the compiled kernel uses ('avx512-vpopcntdq', 'avx2', 'popcnt64'), or None."""
    ext, _ = _build(os.environ.get("IRCONVERT_MARCH", "native"))
    return ext.isa() if ext is not None else None


def conv_words(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the kernel's conv weight words int64 [O, KH, KW, ceil(C_g/64)] from a packed file's int32 bits."""
    o, cg, kh, kw = shape
    signs = _bits(bits, kh * kw * cg).reshape(o, kh, kw, cg)
    return _pack64(signs)


def linear_words(bits: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Return the kernel's linear weight words int64 [ceil(O/8), ceil(F/64), 8] from a packed file's bits."""
    return _interleave(_pack64(_bits(bits, shape[1])))


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    """[O, K] words -> [ceil(O/8), K, 8], the channels past O zero."""
    o, k = rows.shape
    blocks = -(-o // LANES)
    return F.pad(rows, (0, 0, 0, blocks * LANES - o)).reshape(blocks, LANES, k).transpose(1, 2).contiguous()


def _rows(words: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of _interleave: [ceil(O/8), K, 8] words -> [O, K]."""
    return words.transpose(1, 2).reshape(-1, words.shape[1])[:out_features]


def scale_of(exp: torch.Tensor) -> torch.Tensor:
    """Return s = 2^exp as float32 (exact for the int8 exponents of a packed file)."""
    return torch.ldexp(torch.ones(exp.shape, dtype=torch.float32), exp.to(torch.int32))


def _bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Return uint8 bits [rows, n] of int32 words, bit j of word k = element 32k + j."""
    shifts = torch.arange(32, dtype=torch.int64)
    bits = (words.to(torch.int64).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].to(torch.uint8)


def _pack64(bits: torch.Tensor) -> torch.Tensor:
    """Pack uint8 bits [..., n] into int64 words [..., ceil(n/64)], least significant bit first."""
    n = bits.shape[-1]
    words = -(-n // WORD)
    padded = F.pad(bits.to(torch.int64), (0, words * WORD - n)).reshape(*bits.shape[:-1], words, WORD)
    # distinct powers of two never carry, and 1 << 63 is bit 63 in two's complement
    return (padded << torch.arange(WORD, dtype=torch.int64)).sum(-1)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Return the number of set bits of each int64 (SWAR; every step stays non-negative)."""
    m1, m2, m4 = _MASKS
    x = (x & m1) + ((x >> 1) & m1)
    x = (x & m2) + ((x >> 2) & m2)
    x = (x + (x >> 4)) & m4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def pack_activations(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Return int64 words [N, H, W, G, Wc] of sign(x) for NCHW x (bit 1 where !(x >= 0))."""
    n, c, h, w = x.shape
    bits = (~(x >= 0)).to(torch.uint8).reshape(n, groups, c // groups, h, w).permute(0, 3, 4, 1, 2)
    return _pack64(bits)


def _xor_popcount(a: torch.Tensor, w: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return [P, O] sums of popcount((a[p] xor w[o]) & mask[p]), in row chunks that keep memory small."""
    rows = max(1, (1 << 22) // max(1, w.numel()))
    out = []
    for i in range(0, a.shape[0], rows):
        x = a[i:i + rows, None, :] ^ w[None]
        if mask is not None:
            x = x & mask[i:i + rows, None, :]
        out.append(_popcount(x).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, w.shape[0], dtype=torch.int64)


def _conv_dot(a, words, stride, pad, dilation, out_hw, groups, cg) -> torch.Tensor:
    """Return the integer dots int64 [N, O, OH, OW] of packed input a [N, H, W, G, Wc]; padded taps are masked out."""
    n, h, w = a.shape[:3]
    o, kh, kw, wc = words.shape
    (sh, sw), (pt, pl), (dh, dw), (oh, ow) = stride, pad, dilation, out_hw
    og = o // groups
    # pad with a frame wide enough for every tap; the mask marks which positions are real pixels
    bottom = max(0, (oh - 1) * sh + (kh - 1) * dh + 1 - pt - h)
    right = max(0, (ow - 1) * sw + (kw - 1) * dw + 1 - pl - w)
    a = F.pad(a, (0, 0, 0, 0, pl, right, pt, bottom))
    real = F.pad(torch.ones(h, w, dtype=torch.int64), (pl, right, pt, bottom))
    taps, valid = [], []
    for i in range(kh):
        for j in range(kw):
            rs = slice(i * dh, i * dh + (oh - 1) * sh + 1, sh)
            cs = slice(j * dw, j * dw + (ow - 1) * sw + 1, sw)
            taps.append(a[:, rs, cs])
            valid.append(real[rs, cs])
    patches = torch.stack(taps, 3)  # [N, OH, OW, T, G, Wc]
    valid = torch.stack(valid, -1)  # [OH, OW, T]
    mask = (-valid).unsqueeze(-1).expand(oh, ow, kh * kw, wc).reshape(1, oh * ow, -1)
    mask = mask.expand(n, -1, -1).reshape(n * oh * ow, -1)
    n_valid = valid.sum(-1).reshape(1, oh * ow, 1)
    y = torch.empty(n, oh * ow, o, dtype=torch.int64)
    for g in range(groups):
        a_g = patches[..., g, :].reshape(n * oh * ow, -1)
        w_g = words[g * og:(g + 1) * og].reshape(og, -1)
        y[..., g * og:(g + 1) * og] = _xor_popcount(a_g, w_g, mask).reshape(n, oh * ow, og)
    return (n_valid * cg - 2 * y).permute(0, 2, 1).reshape(n, o, oh, ow)


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Return fl32(a * b + c) rounded once, as a fused multiply-add, for float32 a, b, c (broadcast)."""
    p = a.double() * b.double()  # exact: 24 + 24 bits
    c = c.double()
    s = p + c
    # round to odd (s gets an odd last bit where p + c was inexact), so that the one rounding to
    # float32 below is the correct one (53 >= 2 * 24 + 2 bits)
    bv = s - p
    err = (p - (s - bv)) + (c - bv)
    even = (s.view(torch.int64) & 1) == 0
    toward = torch.where(err > 0, math.inf, -math.inf)
    s = torch.where((err != 0) & even, torch.nextafter(s, toward), s)
    return s.float()


def _transform(dot, alpha, beta, fma, res, clamp) -> torch.Tensor:
    """Return y = alpha * dot + beta (one rounding if fma, else two) [+ res] [clamped], dot [N, O, OH, OW]."""
    d, a = dot.to(torch.float32), alpha.reshape(1, -1, 1, 1)
    if beta is None:
        y = d * a
    elif fma:
        y = fma32(d, a, beta.reshape(1, -1, 1, 1))
    else:
        y = d * a + beta.reshape(1, -1, 1, 1)
    if res is not None:
        y = y + res
    return y if clamp is None else torch.clamp(y, *clamp)


def _conv2d_ex_python(x, c, words, alpha, beta, fma, res, clamp, want_float, want_bits, thr, direction,
                      stride, pad, dilation, out_hw, groups) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """PyTorch twin of the compiled conv2d_ex (the same arithmetic, slowly)."""
    wc = words.shape[3]
    if x.dtype == torch.int64:
        a = x.reshape(*x.shape[:3], groups, wc)
    else:
        c = x.shape[1]
        a = pack_activations(x, groups)
    dot = _conv_dot(a, words, stride, pad, dilation, out_hw, groups, c // groups)
    y = _transform(dot, alpha, beta, fma, res, clamp) if want_float or (want_bits and thr is None) else None
    bits = None
    if want_bits:
        if thr is None:
            neg = ~(y >= 0)
        else:
            t, up = thr.reshape(1, -1, 1, 1), direction.reshape(1, -1, 1, 1) > 0
            neg = torch.where(up, dot < t, dot > t)
        bits = _pack64(neg.permute(0, 2, 3, 1).to(torch.uint8))
    # NCHW as the compiled kernel writes it: a float layer reading a channels-last view sums in another order
    return (y.contiguous() if want_float else None), bits


def _linear_python(x, words, scale, bias, in_features) -> torch.Tensor:
    """PyTorch twin of the compiled linear."""
    a = _pack64((~(x >= 0)).to(torch.uint8))
    out = (in_features - 2 * _xor_popcount(a, _rows(words, scale.numel()))).to(torch.float32) * scale
    return out + bias if bias is not None else out


def _native():
    ext, _ = _build(os.environ.get("IRCONVERT_MARCH", "native"))
    return ext


def conv2d(x, words, scale, bias, stride, pad, dilation, out_hw, groups) -> torch.Tensor:
    """Run the bitwise conv on the current backend (arguments already normalized by the caller)."""
    if backend() == "native":
        return _native().conv2d(x, words, scale, bias, *stride, *pad, *dilation, *out_hw, groups)
    return _conv2d_ex_python(x, x.shape[1], words, scale, bias, False, None, None, True, False, None, None,
                             stride, pad, dilation, out_hw, groups)[0]


def conv2d_ex(x, c, words, alpha, beta, fma, res, clamp, want_float, want_bits, thr, direction,
              stride, pad, dilation, out_hw, groups) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Run the conv with its fused output transform (see csrc/bitwise.cpp) on the current backend.

    x is float32 NCHW or int64 packed bits [N, H, W, G * Wc] (then c is the channel count); returns
    (float32 NCHW output or None, packed bits int64 [N, OH, OW, ceil(O / 64)] or None).
    """
    if backend() == "native":
        lo, hi = clamp if clamp is not None else (0.0, 0.0)
        y, bits = _native().conv2d_ex(x, c, words, alpha, beta, fma, res, clamp is not None, lo, hi, want_float,
                                      want_bits, thr, direction, *stride, *pad, *dilation, *out_hw, groups)
        return (y if want_float else None), (bits if want_bits else None)
    return _conv2d_ex_python(x, c, words, alpha, beta, fma, res, clamp, want_float, want_bits, thr, direction,
                             stride, pad, dilation, out_hw, groups)


def pack(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Return the sign bits of float32 NCHW x as int64 words [N, H, W, G * ceil(C_g / 64)] (conv2d_ex's input)."""
    if backend() == "native":
        return _native().pack(x, groups)
    n, _, h, w = x.shape
    return pack_activations(x, groups).reshape(n, h, w, -1)


def linear(x, words, scale, bias, in_features) -> torch.Tensor:
    """Run the bitwise linear on the current backend (x is float32 [N, F], contiguous)."""
    if backend() == "native":
        return _native().linear(x, words, scale, bias, in_features)
    return _linear_python(x, words, scale, bias, in_features)


def affine_maxpool(x, alpha, beta, clamp, kernel, stride, pad, out_hw) -> torch.Tensor:
    """Return max_pool2d(clamp(fma(x, alpha_c, beta_c), *clamp)) of float32 NCHW x (padding -inf), in one pass."""
    if backend() == "native":
        lo, hi = clamp if clamp is not None else (0.0, 0.0)
        return _native().affine_maxpool(x, alpha, beta, clamp is not None, lo, hi, *kernel, *stride, *pad, *out_hw)
    y = _transform_float(x, alpha, beta, clamp)
    return F.max_pool2d(y.contiguous(memory_format=torch.channels_last), kernel, stride, pad).contiguous()


def _transform_float(x, alpha, beta, clamp) -> torch.Tensor:
    y = fma32(x, alpha.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1))
    return y if clamp is None else torch.clamp(y, *clamp)
