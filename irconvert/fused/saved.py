"""What a binary layer's operator keeps for the backward: signs, recomputed or kept in one byte.

A W1A1 layer convolves B_a = sign(x) with the weight Q = s * B_w (s one float per output channel),
and autograd keeps both for the gradients, one float per element, beside the x that the sign's own
backward keeps. `kept_small(signs, source, weight_shape)` is a context (autograd's saved-tensor
hooks) in which, while the layer runs:

- B_a is not kept at all where it is the sign of `source` (a method whose input sign is the fused
  op on x itself): the backward recomputes sign(source) from the x that the sign op keeps anyway,
  by the same kernel, so the same bits. Otherwise B_a is kept as int8 (exact: +-1).
- Q, where the caller vouches that it is s * (+-1) per output channel by construction (Libra-PB's
  fused op in a plain conv/linear: `weight_shape` given), is kept as its sign bits (8 to a byte) and s
  per channel, and rebuilt as where(sign bit, -s, s): the same floats, -0.0 included. The tensor of that
  shape the operator keeps is Q; the latent weight, which Libra-PB's op keeps, is a leaf and stays.

Under torch.compile the graph's own partitioner decides what to keep, so it is off.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch

from .sign import kernel, sign_values


def _pack_weight(t: torch.Tensor):
    """(sign bits, 8 to a byte where t is contiguous, s per output channel): a tensor whose every row holds
    +-s_o (t[o].flatten()[0] is +-s_o)."""
    s = t.reshape(t.shape[0], -1)[:, 0].abs()
    if not t.is_contiguous():  # bools, which keep t's layout for where() to rebuild
        return "scaled signs", torch.signbit(t), s, t.shape
    mod = _bits_kernel(t)
    return "scaled signs", _pack_bits(torch.signbit(t)) if mod is None else mod.pack_signbits(t), s, t.shape


def _bits_kernel(t: torch.Tensor):
    """Return the C++ kernel module packing and unpacking t's sign bits in one pass (None: PyTorch's ops)."""
    return kernel(t) if t.device.type == "cpu" else None


def _unpack_weight(saved) -> torch.Tensor:
    _, neg, s, shape = saved
    mod = _bits_kernel(s) if neg.dtype == torch.uint8 else None
    if mod is not None:
        return mod.unpack_signbits(neg, s, list(shape), s.dtype)
    if neg.dtype == torch.uint8:
        neg = _unpack_bits(neg, shape)
    return torch.where(neg, -s.reshape((-1,) + (1,) * (len(shape) - 1)), s.reshape((-1,) + (1,) * (len(shape) - 1)))


def _bit_values(device: torch.device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8).to(device)


def _pack_bits(b: torch.Tensor) -> torch.Tensor:
    """Return bool tensor b packed 8 to a uint8 (bit j of byte k = element 8k + j of b flattened)."""
    flat = b.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    return (flat.view(-1, 8) * _bit_values(b.device)).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Return the bool tensor of `shape` that _pack_bits packed."""
    n = math.prod(shape)
    return ((packed.unsqueeze(1) & _bit_values(packed.device)) != 0).reshape(-1)[:n].reshape(shape)


@contextmanager
def _hooks(signs: torch.Tensor, source: Optional[torch.Tensor], weight_shape) -> Iterator[None]:
    ptr, shape, dtype = signs.data_ptr(), signs.shape, signs.dtype
    version = None if source is None else source._version

    def pack(t: torch.Tensor):
        if t.layout != torch.strided:
            return t
        if t.data_ptr() == ptr and t.shape == shape and t.dtype == dtype:
            return ("signs of", source) if source is not None else ("int8 signs", t.to(torch.int8), dtype)
        if weight_shape is not None and t.shape == weight_shape and t.dtype.is_floating_point \
                and t.grad_fn is not None:
            # the operator keeps its input (the signs above) and Q (or autocast's copy of it); the latent
            # weight that Libra-PB's op keeps is a leaf
            return _pack_weight(t)
        return t

    def unpack(saved):
        if not isinstance(saved, tuple):
            return saved
        if saved[0] == "signs of":
            if saved[1]._version != version:
                raise RuntimeError("a binary layer's input was modified in place after its forward; its signs "
                                   "are recomputed from it in the backward")
            return sign_values(saved[1])
        if saved[0] == "int8 signs":
            return saved[1].to(saved[2])
        return _unpack_weight(saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def kept_small(signs: torch.Tensor, source: Optional[torch.Tensor] = None, weight_shape=None):
    """Return a context in which autograd keeps the tensor `signs` (all +-1) as sign(source) recomputed in
    the backward (source given) or as int8, and a float tensor of `weight_shape` (the layer's Q = s * B,
    which the caller vouches for) as sign bits and s."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or signs.device.type == "meta":
        return nullcontext()
    return _hooks(signs, source, weight_shape)
