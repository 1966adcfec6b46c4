"""Bitwise W1A1 layers: the functional entry points and the modules that `runtime.load` puts in a model.

A W1A1 binary layer of IR-Net computes y = (s * B_w) (*) sign(x - tau) + b with s per output
channel (2^exp for IR-Net, a float for trained scales) and tau per input channel (SD-BNN's
threshold; 0 for the others), see irconvert.pack. Here B_w is held as 64-bit words, bit 1 = -1, in the kernel's
layout (kernels.conv_words: [O, KH, KW, ceil(C_g/64)], one word run per kernel tap;
kernels.linear_words: [ceil(O/8), ceil(F/64), 8], word k of 8 output channels side by side), and
the product is an integer xor/popcount dot times s (see kernels.py). Inference only: no gradient.

FusedConv2d is the conv with the float ops after it folded in (runtime/fuse.py), reading and writing
packed bits; PackSigns packs an input that several of them share; AffineMaxPool2d and
ChannelsLastMaxPool2d are the float stem's BatchNorm + clamp + max-pool in one pass and a max-pool
in torch's faster memory layout.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..errors import IRConvertError
from ..layers import BinaryMixin
from . import kernels

INFERENCE_ONLY = ("irconvert.runtime: the bitwise model is inference only (xor/popcount has no gradient); "
                  "train the latent model instead: irconvert.load('model.safetensors')")
_ANCHOR = torch.zeros((), requires_grad=True)  # gives a bitwise output a backward that can refuse


class _NoBackward(torch.autograd.Function):
    """Identity forward; a backward through a bitwise layer raises instead of silently skipping it."""

    @staticmethod
    def forward(ctx, y, anchor):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        raise IRConvertError(INFERENCE_ONLY)


def refuse_train(module: nn.Module, mode: bool = True) -> nn.Module:
    """nn.Module.train for inference-only modules: eval() works, train() raises."""
    if mode:
        raise IRConvertError(INFERENCE_ONLY)
    return nn.Module.train(module, False)


def _guard(y: torch.Tensor) -> torch.Tensor:
    return _NoBackward.apply(y, _ANCHOR) if torch.is_grad_enabled() else y

IntPair = Union[int, tuple[int, int]]


def _pair(v: IntPair, what: str) -> tuple[int, int]:
    p = (v, v) if isinstance(v, int) else tuple(int(i) for i in v)
    if len(p) != 2 or min(p) < 0:
        raise ValueError(f"bitwise_conv2d: {what} must be an int or a pair of non-negative ints, got {v!r}")
    return p


def _float32(x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point() or x.device.type != "cpu":
        raise ValueError(f"bitwise layers take a floating-point CPU input, got {x.dtype} on {x.device}")
    # sign() of a float64/bf16/fp16 value equals the sign of its float32 rounding, so nothing is lost
    return x.to(torch.float32).contiguous()


def _geometry(h: int, w: int, kh: int, kw: int, stride: tuple[int, int], padding: Union[IntPair, str],
              dilation: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return ((top, left) padding, (OH, OW)) of a conv as F.conv2d computes them."""
    (sh, sw), (dh, dw) = stride, dilation
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"bitwise_conv2d: padding must be 'same', 'valid' or ints, got {padding!r}")
        # F.conv2d's 'same': the odd pixel of padding goes to the bottom / right
        total = (dh * (kh - 1), dw * (kw - 1)) if padding == "same" else (0, 0)
        pt, pl = total[0] // 2, total[1] // 2
        pb, pr = total[0] - pt, total[1] - pl
    else:
        (pt, pl) = (pb, pr) = _pair(padding, "padding")
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"bitwise_conv2d: input {h}x{w} is smaller than the dilated kernel")
    return (pt, pl), (oh, ow)


def bitwise_conv2d(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
                   groups: int = 1) -> torch.Tensor:
    """Return conv2d(sign(input), s * B) + bias as float32, B as kernels.conv_words words, s = `scale` [O].

    The other arguments are F.conv2d's (zero padding, including 'same' and 'valid').
    """
    unbatched = input.dim() == 3
    x = _float32(input.unsqueeze(0) if unbatched else input)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError("bitwise_conv2d: input must be [N, C, H, W] or [C, H, W], weight words [O, KH, KW, words]")
    _, c, h, w = x.shape
    o, kh, kw, wc = weight.shape
    if c % groups or o % groups or wc != -(-(c // groups) // kernels.WORD) or scale.numel() != o:
        raise ValueError(f"bitwise_conv2d: input has {c} channels, weight words {tuple(weight.shape)} and "
                         f"groups={groups} do not fit together")
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    (pt, pl), (oh, ow) = _geometry(h, w, kh, kw, (sh, sw), padding, (dh, dw))
    y = kernels.conv2d(x, weight.contiguous(), scale.to(torch.float32).contiguous(),
                       None if bias is None else bias.to(torch.float32).contiguous(),
                       (sh, sw), (pt, pl), (dh, dw), (oh, ow), groups)
    return y.squeeze(0) if unbatched else y


def bitwise_linear(input: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, in_features: int,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Return sign(input) @ (s * B)^T + bias as float32, B as kernels.linear_words words, s = `scale` [O]."""
    o = scale.numel()
    if (input.shape[-1] != in_features or weight.dim() != 3 or weight.shape[1] != -(-in_features // kernels.WORD)
            or weight.shape[0] != -(-o // kernels.LANES)):
        raise ValueError(f"bitwise_linear: input [..., {input.shape[-1]}] and weight words {tuple(weight.shape)} "
                         f"do not fit in_features={in_features}")
    x = _float32(input.reshape(-1, in_features))
    y = kernels.linear(x, weight.contiguous(), scale.to(torch.float32).contiguous(),
                       None if bias is None else bias.to(torch.float32).contiguous(), in_features)
    return y.reshape(*input.shape[:-1], o)


def _frozen_bias(m: nn.Module) -> Optional[torch.Tensor]:
    return None if m.bias is None else m.bias.detach().to(torch.float32).clone()


def _threshold(m: nn.Module) -> Optional[torch.Tensor]:
    # x - tau is 0 exactly where x == tau, so its sign is the frozen layer's compare, bit for bit
    tau = getattr(m, "input_threshold", None)
    return None if tau is None else tau.detach().to(torch.float32).clone()


class BitwiseConv2d(nn.Module):
    """Frozen IR-Net W1A1 Conv2d by xor/popcount: y = s * (n_valid * C_g - 2 popcount(B_a xor B_w)) + b."""

    def __init__(self, weight_words: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 in_channels: int, stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
                 groups: int = 1, threshold: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("weight_words", weight_words)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("threshold", threshold)
        self.in_channels, self.out_channels = in_channels, weight_words.shape[0]
        self.kernel_size = tuple(weight_words.shape[1:3])
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        # the Bi-Real shortcut (irconvert.shortcut) reads the real-valued input after the BatchNorm
        self.bireal_keep_input, self.bireal_input = False, None

    @classmethod
    def from_binary(cls, m: BinaryMixin, bits: torch.Tensor, scale: torch.Tensor) -> "BitwiseConv2d":
        """Return the bitwise twin of frozen binary conv `m` from its packed file words and float32 scales."""
        words = kernels.conv_words(bits, tuple(m.latent_weight.shape))
        twin = cls(words, scale, _frozen_bias(m), m.in_channels, m.stride, m.padding,
                   m.dilation, m.groups, _threshold(m))
        twin.bireal_keep_input = getattr(m, "bireal_keep_input", False)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bireal_keep_input:
            self.bireal_input = x
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype).reshape(-1, 1, 1)
        return _guard(bitwise_conv2d(x, self.weight_words, self.scale, self.bias, self.stride, self.padding,
                                     self.dilation, self.groups))

    train = refuse_train

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, W1A1 xor/popcount")


class BitwiseLinear(nn.Module):
    """Frozen IR-Net W1A1 Linear by xor/popcount: y = s * (F - 2 popcount(B_a xor B_w)) + b."""

    def __init__(self, weight_words: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                 threshold: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("weight_words", weight_words)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("threshold", threshold)
        self.in_features, self.out_features = in_features, scale.numel()

    @classmethod
    def from_binary(cls, m: BinaryMixin, bits: torch.Tensor, scale: torch.Tensor) -> "BitwiseLinear":
        """Return the bitwise twin of frozen binary linear `m` from its packed file words and float32 scales."""
        words = kernels.linear_words(bits, tuple(m.latent_weight.shape))
        return cls(words, scale, _frozen_bias(m), m.in_features, _threshold(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            x = x - self.threshold.to(x.dtype)
        return _guard(bitwise_linear(x, self.weight_words, self.scale, self.in_features, self.bias))

    train = refuse_train

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, W1A1 xor/popcount"


class FusedConv2d(BitwiseConv2d):
    """A BitwiseConv2d with the float ops after it folded into its output (see runtime/fuse.py):

        y = clamp(alpha * dot + beta [+ residual], lo, hi)      alpha * dot + beta with one rounding (fma)

    written as float NCHW (`want_float`), as packed sign bits for the next binary layers
    (`want_bits`: bit 1 where !(y >= 0), or where the integer threshold `thr` says so), or both;
    `packed_input`: x is such bits [N, H, W, words], not floats. forward(x, residual=None)
    returns the float output, the bits, or (float, bits).
    """

    def __init__(self, conv: BitwiseConv2d, alpha: torch.Tensor, beta: Optional[torch.Tensor], fma: bool,
                 clamp: Optional[tuple[float, float]] = None, want_float: bool = True, want_bits: bool = False,
                 thr: Optional[torch.Tensor] = None, direction: Optional[torch.Tensor] = None,
                 packed_input: bool = False):
        super().__init__(conv.weight_words, conv.scale, conv.bias, conv.in_channels, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.threshold)
        self.register_buffer("alpha", alpha.to(torch.float32).contiguous())
        self.register_buffer("beta", None if beta is None else beta.to(torch.float32).contiguous())
        self.register_buffer("thr", None if thr is None else thr.to(torch.int32).contiguous())
        self.register_buffer("direction", None if direction is None else direction.to(torch.int8).contiguous())
        self.fma, self.clamp, self.want_float, self.want_bits = fma, clamp, want_float, want_bits
        self.packed_input = packed_input

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        out = self._fused(x, residual)
        if self.want_float and self.want_bits:
            return _guard(out[0]), out[1]
        return _guard(out) if self.want_float else out

    def _fused(self, x: torch.Tensor, residual: Optional[torch.Tensor]):
        if self.packed_input:
            n, h, w = x.shape[:3]
        else:
            if self.threshold is not None:
                x = x - self.threshold.to(x.dtype).reshape(-1, 1, 1)
            x = _float32(x)
            n, _, h, w = x.shape
        kh, kw = self.kernel_size
        pad, out_hw = _geometry(h, w, kh, kw, _pair(self.stride, "stride"), self.padding,
                                _pair(self.dilation, "dilation"))
        res = None
        if residual is not None:
            res = residual.to(torch.float32).contiguous()
            if res.shape != (n, self.out_channels, *out_hw):  # a broadcasting sum: add it after, as the graph did
                return self._unfused_sum(x, residual, pad, out_hw)
        y, bits = kernels.conv2d_ex(x, self.in_channels, self.weight_words, self.alpha, self.beta, self.fma, res,
                                    self.clamp, self.want_float, self.want_bits, self.thr, self.direction,
                                    _pair(self.stride, "stride"), pad, _pair(self.dilation, "dilation"), out_hw,
                                    self.groups)
        if self.want_float and self.want_bits:
            return y, bits
        return y if self.want_float else bits

    def _unfused_sum(self, x, residual, pad, out_hw):
        y, _ = kernels.conv2d_ex(x, self.in_channels, self.weight_words, self.alpha, self.beta, self.fma, None, None,
                                 True, False, None, None, _pair(self.stride, "stride"), pad,
                                 _pair(self.dilation, "dilation"), out_hw, self.groups)
        y = y + residual
        if self.clamp is not None:
            y = torch.clamp(y, *self.clamp)
        bits = kernels.pack(y.contiguous()) if self.want_bits else None
        if self.want_float and self.want_bits:
            return y, bits
        return y if self.want_float else bits

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), "fused: fma" if self.fma else "fused"]
        if self.clamp is not None:
            parts.append(f"clamp={self.clamp}")
        parts.append("in=bits" if self.packed_input else "in=float")
        parts.append("out=" + "+".join(k for k, v in (("float", self.want_float), ("bits", self.want_bits)) if v)
                     + (" (integer thresholds)" if self.thr is not None else ""))
        return ", ".join(parts)


class PackSigns(nn.Module):
    """sign(x) of a float NCHW tensor as packed bits [N, H, W, words], for binary layers that share an input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.pack(_float32(x))


class ChannelsLastMaxPool2d(nn.Module):
    """nn.MaxPool2d computed in channels-last memory and returned NCHW: the same values (a max is exact in any
    order), where torch's NCHW max-pool kernel is ~20x slower on the stem of a ResNet."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return self.pool(x)
        return self.pool(x.contiguous(memory_format=torch.channels_last)).contiguous()


class AffineMaxPool2d(nn.Module):
    """max_pool2d(clamp(alpha * x + beta)) in one pass: a BatchNorm (as the fma torch computes), a Hardtanh / ReLU
    and the max-pool after them, as in a ResNet stem; the float simulation's values exactly (fma, clamp and max
    are the same float ops), without its three passes over the full-size tensor."""

    def __init__(self, alpha: torch.Tensor, beta: torch.Tensor, clamp: Optional[tuple[float, float]],
                 pool: nn.MaxPool2d):
        super().__init__()
        self.register_buffer("alpha", alpha.to(torch.float32).contiguous())
        self.register_buffer("beta", beta.to(torch.float32).contiguous())
        self.clamp = clamp
        self.kernel_size = _pair(pool.kernel_size, "kernel_size")
        self.stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size, "stride")
        self.padding = _pair(pool.padding, "padding")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _float32(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out_hw = ((x.shape[2] + 2 * ph - kh) // sh + 1, (x.shape[3] + 2 * pw - kw) // sw + 1)
        return kernels.affine_maxpool(x, self.alpha, self.beta, self.clamp, self.kernel_size, self.stride,
                                      self.padding, out_hw)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, clamp={self.clamp}"
