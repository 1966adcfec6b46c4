"""Bitwise inference: run a packed.safetensors model with its W1A1 layers computed by xor/popcount.

    net = irconvert.runtime.load("packed.safetensors")      # nn.Module, outputs equal load_packed's
    y = irconvert.runtime.bitwise_conv2d(x, words, scale, bias, stride, padding, dilation, groups)
    y = irconvert.runtime.bitwise_linear(x, words, scale, in_features, bias)

`build` says which layers are taken over, `fuse` folds BatchNorm, residual sums and activations into the
bitwise convs and chains them in packed bits (the plan, from the torch.fx graph), `layers` holds the
modules and functional entry points,
`kernels` the compiled kernel (JIT-built on first use) and its pure-PyTorch fallback, `bench` the
timings behind `irconvert bench-runtime` and `python -m bench.runtime`.
"""

from .build import float_reason, load
from .kernels import backend, conv_words, linear_words, native_isa, scale_of
from .fuse import RuntimeReport
from .layers import BitwiseConv2d, BitwiseLinear, FusedConv2d, PackSigns, bitwise_conv2d, bitwise_linear

__all__ = [
    "BitwiseConv2d", "BitwiseLinear", "FusedConv2d", "PackSigns", "RuntimeReport", "backend", "bitwise_conv2d", "bitwise_linear", "conv_words", "float_reason",
    "linear_words", "load", "native_isa", "scale_of",
]
