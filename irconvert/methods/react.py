"""ReActNet's learnable sign threshold and shifted PReLU (Liu, Shen, Savvides and Cheng, "ReActNet:
Towards Precise Binary Neural Network with Generalized Activation Functions", ECCV 2020, Sec. 3.2).

RSign, per input channel c of a W1A1 layer, alpha learnable:

    B_a = sign(x_c - alpha_c)            sign(0) = +1; alpha starts at 0 (the plain sign)
    dL/dalpha_c = -sum over the channel's positions of sign'(x - alpha) * dL/dB_a

sign' is the method's own estimator (EDE for irnet, the clipped STE for vanilla), so RSign composes
with any method that has no input shift of its own: `with_rsign(cls)` puts `RSign` in front of it.
The paper's sign is +1 only where x > alpha; here x = alpha gives +1, as everywhere in irconvert.
Deployment: sign(x - alpha) = +1 exactly where x >= alpha (IEEE subtraction is monotone and 0 only
for x = alpha), so alpha is the packed file's per-channel input threshold (`input.threshold`, the
field SD-BNN's ASD uses), and the frozen and bitwise layers compute the same bits from it.

RPReLU, per channel c, gamma, beta and zeta learnable, in place of the activation in front of a
binary layer (where the converter otherwise puts Hardtanh):

    f(x) = x - gamma_c + zeta_c             if x - gamma_c > 0
           beta_c (x - gamma_c) + zeta_c     otherwise

Init (ours; the paper trains from scratch): gamma = zeta = 0 and beta = 0.25, PyTorch's PReLU
default that ReActNet's code starts from. A converted pretrained network had a ReLU there: with
beta = 0.25 the real-valued paths (the residual shortcut, pooling, the full-precision head) see
x for x > 0 as the ReLU gave them, unclipped (Hardtanh clips at 1), and a small slope below; the
binary layer after it sees sign(f(x)) = sign(x), both signs (beta = 0 would be the ReLU, whose
output gives only +1 bits; beta = 1 the identity, farther from what the pretrained weights saw).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..fused.rprelu import rprelu_keeping_output, shifted_sign
from ..ops import input_channels, per_input_channel
from .base import Binarizer, declared_mode
from .ede import mode_tk

RPRELU_BETA = 0.25


class RSign:
    """RSign as a method part: B_a = sign(x - alpha) with alpha [in channels] learnable (W1A1 only), starting at 0."""

    def init(self, layer) -> tuple[str, ...]:
        names = super().init(layer)
        if layer.binary_mode != "W1A1":
            return names
        w = layer._parameters["weight"]
        channels = input_channels(layer)
        layer.rsign_alpha = nn.Parameter(torch.zeros(channels, dtype=w.dtype, device=w.device))
        return names + ("rsign_alpha",)

    def shift_input(self, x: torch.Tensor, layer) -> torch.Tensor:
        return x - per_input_channel(layer.rsign_alpha, x, layer)

    def activation(self, x: torch.Tensor, layer) -> torch.Tensor:
        """B_a = sign(x - alpha); where the method's input sign is the fused op (a declared mode), the sign
        keeps x, which the activation in front keeps anyway, not the shifted copy (fused/rprelu.py)."""
        mode = declared_mode(type(self), "input_sign")
        if mode is not None and layer.binary_mode == "W1A1":
            tk = mode_tk(layer, mode, x.device)
            signs = shifted_sign(x, per_input_channel(layer.rsign_alpha, x, layer), tk, mode)
            if signs is not None:
                return signs
        return super().activation(x, layer)

    def threshold(self, layer) -> Optional[torch.Tensor]:
        alpha = layer._parameters.get("rsign_alpha")
        return None if alpha is None or layer.binary_mode != "W1A1" else alpha.detach().float()


def has_input_shift(cls: type) -> bool:
    """True if method class `cls` shifts the input before its sign (SD-BNN's ASD, RSign)."""
    return cls.shift_input is not Binarizer.shift_input or cls.threshold is not Binarizer.threshold


@functools.lru_cache(maxsize=None)
def with_rsign(cls: type) -> type:
    """Return method class `cls` with RSign in front of it (one class per `cls`); ValueError if it shifts its input."""
    if issubclass(cls, RSign):
        return cls
    if has_input_shift(cls):
        # two thresholds in a row would not be one exact compare at deployment
        raise ValueError(f"method {cls.name} already learns an input threshold; rsign adds a second one "
                         "(set rsign: false, or choose a method without an input shift such as irnet)")
    doc = f"{cls.__qualname__} with ReActNet's RSign on its input (see irconvert.methods.react)."
    return type(f"{cls.__name__}RSign", (RSign, cls), {"name": f"{cls.name}+rsign", "__doc__": doc,
                                                        "__module__": __name__})


class RPReLU(nn.Module):
    """ReActNet's RPReLU: f(x) = x - gamma + zeta where x > gamma, else beta (x - gamma) + zeta.

    `shape` is the parameters' shape, which broadcasts over the input: (C, 1, 1) for an image tensor
    [N, C, H, W], (C,) for channels last or [N, C], (1,) for one value shared by all channels."""

    def __init__(self, shape: Sequence[int], dtype: Optional[torch.dtype] = None,
                 device: Union[torch.device, str, None] = None):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        self.gamma = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        self.beta = nn.Parameter(torch.full(shape, RPRELU_BETA, dtype=dtype, device=device))
        self.zeta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept_small = rprelu_keeping_output(x, self.gamma, self.beta, self.zeta)  # training memory (fused/rprelu.py)
        if kept_small is not None:
            return kept_small
        y = x - self.gamma
        return torch.where(y > 0, y, y * self.beta) + self.zeta

    def extra_repr(self) -> str:
        return f"shape={tuple(self.gamma.shape)}"


def parameter_shape(x: torch.Tensor, channels_last: bool) -> tuple[int, ...]:
    """Return the per-channel parameter shape for input `x`: channels at dim 1 (image), or last."""
    if x.dim() <= 2 or channels_last:
        return (x.shape[-1],)
    return (x.shape[1],) + (1,) * (x.dim() - 2)


@torch.no_grad()
def rprelu_shapes(model: nn.Module, names: Sequence[str], channels_last: set[str],
                  args: tuple[torch.Tensor, ...]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Return ({activation module name: RPReLU parameter shape}, names given one shared value) from one eval
    forward of `model` on `args`: a module called with inputs of different channel counts (a shared
    ReLU) or not called at all gets the shape (1,)."""
    seen: dict[str, set] = {n: set() for n in names}

    def hook(name):
        return lambda mod, a: seen[name].add(parameter_shape(a[0], name in channels_last))

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with torch.random.fork_rng(devices=[]):
            model.eval()(*(a.to(dev) for a in args))
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    shapes = {n: next(iter(s)) if len(s) == 1 else (1,) for n, s in seen.items()}
    return shapes, sorted(n for n, s in seen.items() if len(s) != 1)
