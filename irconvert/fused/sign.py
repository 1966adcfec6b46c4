"""The sign of binary training as one fused op: forward in one pass, backward in one pass.

    forward:  B = sign(x), sign(0) = +1 (bit-identical to `torch.where(x >= 0, 1, -1)`)
    backward: dL/dx = dL/dB * d(x), the surrogate derivative of `mode`:
        ede     k * t * (1 - tanh^2(t x))   EDE, IR-Net (Qin et al., CVPR 2020, Eq. 10-11)
        ste     1{|x| <= 1}                 the clipped straight-through estimator (BinaryNet)
        approx  max(0, 2 - 2|x|)            ApproxSign (Liu et al., Bi-Real Net, ECCV 2018)
    clip:     a Hardtanh(-1, 1) in front of the sign, fused into it (swap.fuse_hardtanh): the forward is
              the same, as sign(hardtanh x) = sign x; the backward is g * d(x) where -1 < x < 1, as
              hardtanh x = x there, and 0 elsewhere, boundaries and NaN included, as PyTorch's
              hardtanh_backward selects it (its vectorized loop; its scalar tail lets NaN through).
              The Hardtanh's output, a float tensor kept for the sign's backward, is gone.

Only x is saved for the backward (the unfused code also kept tanh(t x), and for STE/ApproxSign a
derivative tensor, as temporaries of several kernels). `irconvert::binary_sign` is a torch.library
custom op with a fake (meta) implementation and autograd, so it runs the same in eager mode, under
autocast (it keeps x's dtype, as `sign` did) and inside torch.compile without a graph break. EDE's
t and k arrive as a tensor [t, k] (the layers keep one as a buffer): a t that moves every step is
then data, not a constant a compiled graph would be specialized on.

Implementations, chosen per call by device and by the environment variable IRCONVERT_TRAIN_KERNELS:
    auto (default)  CUDA: the Triton kernels (triton_sign.py); CPU: the C++ kernel compiled from
                    irconvert/csrc/sign.cpp by the runtime's build helper. Where one is missing
                    (no triton, no compiler), the PyTorch code below, with one warning.
    fused           the fused kernel, or an IRConvertError saying why it is unavailable
    python          the PyTorch code: several kernels, the same numbers (the reference in tests)
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from ..errors import IRConvertError

ENV = "IRCONVERT_TRAIN_KERNELS"
CHOICES = ("auto", "fused", "python")
MODES = ("ede", "ste", "approx")
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sign_torch(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) in {-1, +1} with sign(0) = +1, in PyTorch (the reference of the fused kernels)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def grad_torch(g: torch.Tensor, x: torch.Tensor, tk: Optional[torch.Tensor], mode: str,
               clip: bool = False) -> torch.Tensor:
    """Return g * d(x) for surrogate `mode`, in PyTorch (the unfused code of ede.py and quantizers.py); with
    clip, then Hardtanh(-1, 1)'s own backward at x."""
    grad = _surrogate_grad(g, x, tk, mode)
    if not clip:
        return grad
    return torch.where((x > -1.0) & (x < 1.0), grad, 0.0)  # NaN: 0, as hardtanh_backward's vector loop


def _surrogate_grad(g: torch.Tensor, x: torch.Tensor, tk: Optional[torch.Tensor], mode: str) -> torch.Tensor:
    if mode == "ede":
        t, k = tk[0].to(x.dtype), tk[1].to(x.dtype)
        # tanh_backward computes g * (1 - th^2) in one pass
        return torch.ops.aten.tanh_backward(g, (x * t).tanh_()) * (k * t).to(g.dtype)
    if mode == "ste":
        return g * (x.abs() <= 1).to(g.dtype)
    return g * (2.0 - 2.0 * x.abs()).clamp_(min=0).to(g.dtype)


def _choice() -> str:
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise IRConvertError(f"{ENV}={want!r}: choose one of {', '.join(CHOICES)}")
    return want


@functools.lru_cache(maxsize=None)
def _cpu_kernel():
    """Return (the compiled CPU extension or None, why not)."""
    from ..native import build

    return build(os.environ.get("IRCONVERT_MARCH", "native"), "sign.cpp")


@functools.lru_cache(maxsize=None)
def _cuda_kernel():
    """Return (the Triton module or None, why not)."""
    try:
        from . import triton_sign
    except Exception as exc:  # no triton, or one that cannot target this machine
        return None, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return triton_sign, ""


@functools.lru_cache(maxsize=None)
def _warn(why: str) -> None:
    warnings.warn(f"irconvert.fused: the fused sign kernel is unavailable ({why}); using PyTorch's "
                  f"unfused ops (same numbers, slower)", RuntimeWarning, stacklevel=4)


def kernel(x: torch.Tensor):
    """Return the module holding the fused sign_forward/sign_backward for x, or None for PyTorch's ops."""
    want = _choice()
    if want == "python":
        return None
    if x.device.type == "cuda":
        mod, why = _cuda_kernel()
    elif x.device.type == "cpu":
        mod, why = _cpu_kernel()
        if mod is not None and x.dtype not in _CPU_DTYPES:
            mod, why = None, f"dtype {x.dtype}"
    else:
        mod, why = None, f"no fused kernel for device {x.device.type}"
    if mod is None:
        if want == "fused":
            raise IRConvertError(f"{ENV}=fused: {why}; install a C++ compiler (CPU) or triton (CUDA), "
                                 "or unset it to use PyTorch's ops")
        _warn(why)
    return mod


def _dense(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return the tensors laid out alike in memory (contiguous, or all channels-last), as the kernels read,
    with the same strides: two tensors contiguous in one format may still differ in the stride of a size-1
    dimension ([4, 1, 386] as (386, 386, 1) and (386, 1, 1), timm's CSATv2), which never moves an element,
    and the kernels compare strides."""
    fmt = torch.channels_last if ts[0].dim() == 4 and ts[0].is_contiguous(memory_format=torch.channels_last) \
        and not ts[0].is_contiguous() else torch.contiguous_format
    ts = tuple(t.contiguous(memory_format=fmt) for t in ts)
    ref = ts[0]
    return tuple(t.as_strided(t.shape, ref.stride()) if t.shape == ref.shape and t.stride() != ref.stride() else t
                 for t in ts)


@torch.library.custom_op("irconvert::binary_sign", mutates_args=())
def binary_sign_op(x: torch.Tensor, tk: Optional[torch.Tensor], mode: str, clip: bool = False) -> torch.Tensor:
    """sign(x) with sign(0) = +1; tk, mode and clip only shape the backward."""
    return sign_values(x)


@binary_sign_op.register_fake
def _(x, tk, mode, clip=False):
    return torch.empty_like(x)


def sign_values(x: torch.Tensor) -> torch.Tensor:
    """Return sign(x) (sign(0) = +1) by the fused kernel or PyTorch's ops, without autograd: the op's forward."""
    mod = kernel(x)
    return sign_torch(x) if mod is None else mod.sign_forward(*_dense(x))


@torch.library.custom_op("irconvert::binary_sign_grad", mutates_args=())
def binary_sign_grad(g: torch.Tensor, x: torch.Tensor, tk: Optional[torch.Tensor], mode: str,
                     clip: bool = False) -> torch.Tensor:
    """g times the surrogate derivative of sign at x, 0 where clip unless -1 < x < 1 (module docstring)."""
    mod = kernel(x)
    if mod is None or g.dtype != x.dtype:
        return grad_torch(g, x, tk, mode, clip)
    g, x = _dense(g, x)
    if x.device.type == "cpu":
        t, k = (float(v) for v in tk.tolist()) if tk is not None else (0.0, 0.0)
        return mod.sign_backward(g, x, MODES.index(mode), t, k, clip)
    return mod.sign_backward(g, x, None if tk is None else tk.to(x.device, torch.float32), mode, clip)


@binary_sign_grad.register_fake
def _(g, x, tk, mode, clip=False):
    return torch.empty_like(x)


def _setup(ctx, inputs, output) -> None:
    x, tk, mode, clip = inputs
    ctx.save_for_backward(x, tk)
    ctx.mode, ctx.clip = mode, clip


def _backward(ctx, grad):
    x, tk = ctx.saved_tensors
    return binary_sign_grad(grad, x, tk, ctx.mode, ctx.clip), None, None, None


binary_sign_op.register_autograd(_backward, setup_context=_setup)


def binary_sign(x: torch.Tensor, mode: str = "ede", tk: Optional[torch.Tensor] = None,
                clip: bool = False) -> torch.Tensor:
    """Return sign(x) (sign(0) = +1) whose gradient is `mode`'s surrogate; tk = tensor [t, k] for EDE;
    clip: times Hardtanh(-1, 1)'s gradient, for sign(hardtanh x) with the Hardtanh fused away."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "ede" and tk is None:
        raise ValueError("mode 'ede' needs tk = tensor([t, k])")
    return binary_sign_op(x, tk, mode, clip)
