"""Signs kept for the backward in one byte instead of four (or two).

A W1A1 layer convolves B_a = sign(x), and autograd keeps B_a for the weight gradient, one float
per activation, beside the x that the sign's own backward keeps. B_a is exactly +-1, so
`int8_signs(b)` stores it as int8 while the layer runs (autograd's saved-tensor hooks) and gives
back the same float values (bit-identical: int8 -> float is exact for +-1) when the backward
needs them. Under torch.compile the graph's own partitioner decides what to keep, so it is off.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch


@contextmanager
def _hooks(signs: torch.Tensor) -> Iterator[None]:
    ptr, shape, dtype = signs.data_ptr(), signs.shape, signs.dtype

    def pack(t: torch.Tensor):
        if t.data_ptr() == ptr and t.shape == shape and t.dtype == dtype and t.layout == torch.strided:
            return ("int8 signs", t.to(torch.int8), dtype)
        return t

    def unpack(saved):
        if isinstance(saved, tuple):
            return saved[1].to(saved[2])
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def int8_signs(signs: torch.Tensor):
    """Return a context in which autograd keeps the tensor `signs` (all +-1) as int8."""
    if not signs.requires_grad or torch.compiler.is_compiling() or signs.device.type == "meta":
        return nullcontext()
    return _hooks(signs)
