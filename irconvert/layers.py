"""Binary layers of IR-Net (Qin et al., "Forward and Backward Information Retention for Accurate
Binary Neural Networks", CVPR 2020).

A binary layer computes, for a conv or linear operator (*):

    W1A1:   y = (s * B_w) (*) B_a + b,   B_w = sign(w_hat), s = 2^round(log2 mean|w_hat|),
                                         w_hat = (w - mean w) / std w per output channel (Libra-PB),
                                         B_a = sign(a), sign(0) = +1, no activation scale
    W1A32:  y = (s * B_w) (*) a + b

and backpropagates through both signs with EDE, k * t * (1 - tanh^2(t x)) (see `ede.py`).
(The formulas above are the `irnet` method; `methods.py` holds the others.)

`binarize()` also gives each layer a fixed power-of-two gain 2^g, the weight becoming 2^g * s * B_w
with g = round(log2 std(w)) of the weight it had at conversion (`Policy.keep_magnitude`): B_w is
+-1 where the pretrained weight was ~std(w), so without it a binary layer that no normalization
follows (a transformer branch) multiplies activations and gradients by ~1/std(w), which compounds
over the blocks. Under a BatchNorm the gain cancels. 2^g * s is still a power of two per channel.

Design: a binary layer is the original layer's own class with `BinaryMixin` in front of it. The
mixin turns `self.weight` into a property that returns the binarized weight, and binarizes the
input before calling the class's own `forward`. So a subclass with its own forward (timm's
StdConv2d, Conv2dSame, ScaledStdConv2d, ...) keeps its padding and standardization untouched, the
latent weight stays in `_parameters['weight']` (state_dict keys do not change), and no class is
special-cased. `BinaryConv2d` and `BinaryLinear` are the two common instances; `binary_class`
makes the others on demand.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .fused.saved import kept_small
from .methods.ede import T_MIN, ede_k
from .methods import Binarizer
from .methods.base import clipped_sign, plain_input_mode
from .methods.libra import signs_times_scale
from .ops import SUPPORTED, fan_in, is_depthwise, magnitude, per_input_channel, sign  # noqa: F401  (re-exported)

MODES = ("W1A1", "W1A32")


@dataclass
class BinaryState:
    """Everything a binary layer holds besides its tensors, one object at `layer.binary` (not in the state_dict)."""

    method: Binarizer  # the binarization method (methods/)
    mode: str = "W1A1"  # 'W1A1' or 'W1A32'
    gain: int = 0  # g of the fixed gain 2^g (Policy.keep_magnitude)
    frozen: bool = False  # rebuilt from a packed file: the stored weight already is 2^g * s * B, see `freeze`
    params: tuple[str, ...] = ()  # names of the method's own parameters (SD-BNN's shifts, ...), in the state_dict
    ede_t: float = T_MIN  # EDE's t and k, set per step by the trainer
    ede_k: float = field(default_factory=lambda: ede_k(T_MIN))
    keep_input: bool = False  # a Bi-Real shortcut (shortcut.py) adds this layer's input after its BatchNorm
    input: Optional[torch.Tensor] = None  # that input, between the forward of the layer and of its BatchNorm
    grad_scale: float = 1.0  # W1A1: the input's gradient is multiplied by it (calibrate.py)
    clip: bool = False  # W1A1: the Hardtanh(-1, 1) in front is fused into the input's sign (swap.fuse_hardtanh)


def _state(name: str, doc: str) -> property:
    """A layer attribute that is a field of its BinaryState (the names callers have always used)."""
    return property(lambda self: getattr(self.binary, name), lambda self, v: setattr(self.binary, name, v), doc=doc)


class BinaryMixin:
    """Put in front of an nn.Conv*d / nn.Linear class: weight and input are binarized by the layer's
    method. `make_binary` sets `binary`, a BinaryState; `binarizer`, `binary_mode`, `binary_gain`,
    `binary_frozen`, `binary_params`, `ede_t`, `ede_k`, `bireal_keep_input` and `bireal_input` read
    and write its fields. The non-persistent buffer `ede_tk` holds [t, k] as a tensor for the fused sign.
    """

    binarizer = _state("method", "the binarization method")
    binary_mode = _state("mode", "'W1A1' or 'W1A32'")
    binary_gain = _state("gain", "g of the fixed gain 2^g")
    binary_frozen = _state("frozen", "True in a model rebuilt from a packed file")
    binary_params = _state("params", "names of the method's own parameters")
    ede_t = _state("ede_t", "EDE's t (set_ede also writes it to the buffer ede_tk the sign reads)")
    ede_k = _state("ede_k", "EDE's k")
    bireal_keep_input = _state("keep_input", "a Bi-Real shortcut reads the input")
    bireal_input = _state("input", "the input a Bi-Real shortcut reads")
    input_grad_scale = _state("grad_scale", "W1A1: the input's gradient is multiplied by it (see calibrate.py)")

    @property
    def weight(self) -> torch.Tensor:
        latent = self._parameters["weight"]
        if self.binary_frozen:
            return latent
        return _recomputed_when_compiled(self._binary_weight, latent, _recompute_all_context, (torch.bfloat16,))

    def _binary_weight(self, latent: torch.Tensor) -> torch.Tensor:
        """2^g * s * B_w with the method's gradient. Inside torch.compile every op of it is marked for
        recomputation: the backward makes the binary weight again from the latent one (Libra-PB's few ms)
        instead of keeping it as floats for the operator, as kept_small packs it to bits in eager mode."""
        w = self.binarizer.weight(latent, self)
        return w * 2.0**self.binary_gain if self.binary_gain else w

    @property
    def latent_weight(self) -> torch.Tensor:
        """The full-precision latent weight the optimizer updates."""
        return self._parameters["weight"]

    def forward(self, input, *args, **kwargs):
        if self.bireal_keep_input:  # the Bi-Real shortcut (shortcut.py) adds it after the BatchNorm
            self.bireal_input = input
        if self.binary_mode == "W1A1":
            if self.binary_frozen:
                return self._w1a1_forward(self._frozen_sign(input), *args, **kwargs)
            if self.input_grad_scale != 1.0 and torch.is_grad_enabled():
                input = GradScale.apply(input, self.input_grad_scale)
            signs = self._input_signs(input)
            # what the operator keeps for its backward: the signs recomputed from input, or int8; Q as bits
            source = input if plain_input_mode(type(self.binarizer)) is not None else None
            with kept_small(signs, source, self._parameters["weight"].shape if _plain_q(self) else None):
                return self._w1a1_forward(signs, *args, **kwargs)
        if self.binary.clip:  # made W1A32 after swap.fuse_hardtanh took the Hardtanh in front: it is here
            input = nn.functional.hardtanh(input)
        return super().forward(input, *args, **kwargs)

    def _w1a1_forward(self, signs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The operator on B_a, its bias added after it: conv(B_a, s * B_w) + b. Each term is +-2^e, so
        the sum is exact in any order, and the one rounding of + b is the bitwise kernels'. A conv kernel
        that starts its sums at the bias rounds at every step (oneDNN's choice, by CPU: an AMD EPYC), so the
        packed model and the runtime differed by an ulp there. Other classes (timm's) run their own forward."""
        bias = self._parameters.get("bias")
        if bias is None or type(self) not in _PLAIN_BINARY:
            return super().forward(signs, *args, **kwargs)
        if isinstance(self, nn.Linear):
            out = nn.functional.linear(signs, self.weight)
            return out + bias.to(out.dtype)  # autocast's dtype, as the operator would give it
        out = self._conv_forward(signs, self.weight, None)
        return out + bias.to(out.dtype).view(-1, *([1] * len(self.kernel_size)))  # batched or not; autocast's dtype

    def _input_signs(self, x: torch.Tensor) -> torch.Tensor:
        """B_a, the input's signs with the method's gradient. Inside torch.compile the sign op is marked for
        recomputation (kept_small's saved-tensor hooks do not run there): the backward makes B_a again from
        the input it keeps for the sign's own gradient, instead of keeping B_a as floats for the operator."""
        return _recomputed_when_compiled(self._signs, x, _recompute_sign_context, (torch.bfloat16, torch.float16))

    def _signs(self, x: torch.Tensor) -> torch.Tensor:
        return clipped_sign(x, self) if self.binary.clip else self.binarizer.activation(x, self)

    def _frozen_sign(self, x: torch.Tensor) -> torch.Tensor:
        """sign(x - tau) with the packed file's per-channel threshold tau (0 where it has none)."""
        tau = getattr(self, "input_threshold", None)
        if tau is None:
            return sign(x)
        return sign(x - per_input_channel(tau, x, self))

    def freeze(self, weight: torch.Tensor, threshold: Optional[torch.Tensor] = None) -> None:
        """Make this a deployment layer: weight = the stored scale * B as it is, the method's own
        parameters gone, the input binarized as sign(x - threshold)."""
        # what the method learned is now in the weight and the threshold: still counted as the model's parameters
        self.frozen_params = sum(self._parameters[n].numel() for n in self.binary_params)
        for name in self.binary_params:
            del self._parameters[name]
        self.binary_params = ()
        self._parameters["weight"] = nn.Parameter(weight.to(self._parameters["weight"].dtype), requires_grad=False)
        self.register_buffer("input_threshold", None if threshold is None else threshold.float(), persistent=False)
        self.binary_frozen = True

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.binary_mode}, method={self.binarizer.name}"


def _plain_q(layer: nn.Module) -> bool:
    """True if the layer's operator is a plain nn.Conv*d / nn.Linear and its Q is s * (+-1) per output channel."""
    # float64 takes the unfused weight path (LibraPB.weight), whose saved w_hat has Q's shape
    return (type(layer).__mro__[2] in _STATIC and layer._parameters["weight"].dtype != torch.float64
            and signs_times_scale(type(layer.binarizer)))


def _recompute_sign_context():
    """Selective checkpointing for the input's signs: the fused sign and its cast to autocast's dtype are
    recomputed in the backward, anything else in front of them (an input shift) is kept."""
    again = (torch.ops.irconvert.binary_sign.default, torch.ops.aten._to_copy.default)
    return create_selective_checkpoint_contexts(
        lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE if op in again
        else CheckpointPolicy.PREFER_SAVE)


def _recompute_all_context():
    """Selective checkpointing for the binary weight: every op recomputed in the backward."""
    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.MUST_RECOMPUTE)


def _recomputed_when_compiled(fn, x: torch.Tensor, context_fn, cast_to: tuple[torch.dtype, ...]) -> torch.Tensor:
    """Return fn(x); inside torch.compile (with grad) run it under selective checkpointing with `context_fn`'s
    policy, and cast its result to autocast's dtype where autocast is on with one of `cast_to` (the dtype the
    conv/linear casts it to), so that the cast is recomputed with it: autocast's own cast at the operator
    would be kept for the backward. The values do not change: +-1 is exact in either dtype, and a binary
    weight's powers of two are exact in bfloat16 (fp32's exponent range), the only dtype it is given."""
    if not (torch.compiler.is_compiling() and torch.is_grad_enabled()):
        return fn(x)

    def cast(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        kind = out.device.type
        if torch.is_autocast_enabled(kind) and (dtype := torch.get_autocast_dtype(kind)) in cast_to:
            return out.to(dtype)
        return out

    return checkpoint(cast, x, use_reentrant=False, context_fn=context_fn)


class GradScale(torch.autograd.Function):
    """Identity forward, gradient times c backward: EDE on the normalized input a / std(a)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: float) -> torch.Tensor:
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.c, None


class BinaryConv2d(BinaryMixin, nn.Conv2d):
    """IR-Net binary Conv2d: y = conv(B_a, s * B_w) + b (W1A1) or conv(a, s * B_w) + b (W1A32)."""


class BinaryLinear(BinaryMixin, nn.Linear):
    """IR-Net binary Linear: y = B_a (s * B_w)^T + b (W1A1) or a (s * B_w)^T + b (W1A32)."""


class BinaryConv1d(BinaryMixin, nn.Conv1d):
    """IR-Net binary Conv1d, the same equations as BinaryConv2d."""


class BinaryConv3d(BinaryMixin, nn.Conv3d):
    """IR-Net binary Conv3d, the same equations as BinaryConv2d."""


_STATIC = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear, nn.Conv1d: BinaryConv1d, nn.Conv3d: BinaryConv3d}
_PLAIN_BINARY = frozenset(_STATIC.values())


@functools.lru_cache(maxsize=None)
def binary_class(cls: type) -> type:
    """Return the binary version of layer class `cls` (BinaryMixin placed before it in the MRO)."""
    if issubclass(cls, BinaryMixin):
        return cls
    if cls in _STATIC:
        return _STATIC[cls]
    doc = f"IR-Net binary version of {cls.__module__}.{cls.__qualname__} (see irconvert.layers)."
    return type(f"Binary{cls.__name__}", (BinaryMixin, cls), {"__doc__": doc, "__module__": __name__})


def can_binarize(module: nn.Module) -> bool:
    """True if `module` is a conv/linear whose weight is laid out one row per output channel."""
    if not isinstance(module, SUPPORTED) or isinstance(module, BinaryMixin):
        return False
    w = module._parameters.get("weight")
    if not isinstance(w, torch.Tensor):
        return False
    out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
    want_dim = 2 if isinstance(module, nn.Linear) else len(module.kernel_size) + 2
    return w.dim() == want_dim and w.shape[0] == out


def _check_mode(mode: str) -> None:
    """ValueError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def make_binary(module: nn.Module, binarizer: Binarizer, mode: str = "W1A1", gain: int = 0,
                grad_scale: float = 1.0) -> nn.Module:
    """Turn `module` into a binary layer in place (its class gains BinaryMixin), its weight times 2^gain,
    its input's gradient times grad_scale; return it."""
    _check_mode(mode)
    module.__class__ = binary_class(type(module))
    module.binary = BinaryState(binarizer, mode, int(gain))
    w = module._parameters["weight"]
    # EDE's t and k as data for the fused sign: a compiled graph reads the buffer, not a constant
    module.register_buffer("ede_tk", torch.tensor([T_MIN, ede_k(T_MIN)], device=w.device), persistent=False)
    module.binary.grad_scale = float(grad_scale)
    module.binary.params = binarizer.init(module)
    return module


def set_mode(module: nn.Module, mode: str) -> None:
    """Make binary `module` a `mode` layer with its method's parameters registered anew for that mode: a
    parameter only W1A1 uses (RSign's alpha, SD-BNN's input shift) goes with W1A1, so the layer's
    state_dict is the one a layer made in `mode` has (what a file's reload builds). For a layer fresh
    from conversion (calibration): parameters it already trained would start again."""
    _check_mode(mode)
    if mode == module.binary_mode:
        return
    for name in module.binary_params:
        delattr(module, name)
    module.binary_mode = mode
    module.binary.params = module.binarizer.init(module)


def binary_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield (name, module) for every binarized layer of `model`."""
    for name, m in model.named_modules():
        if isinstance(m, BinaryMixin):
            yield name, m


def set_ede(model: nn.Module, t: float) -> None:
    """Set EDE's t, and k = max(1/t, 1), on every binary layer of `model`."""
    k = ede_k(t)
    tk = torch.tensor([float(t), k])
    for _, m in binary_layers(model):
        m.ede_t, m.ede_k = float(t), k
        m.ede_tk.copy_(tk)  # in place: a compiled graph reads the buffer, not the float


def method_penalty(model: nn.Module):
    """Return the sum of the binary layers' method loss terms (trained-scale L2, ...), or None if none has one."""
    terms = [t for _, m in binary_layers(model) if (t := m.binarizer.penalty(m)) is not None]
    return sum(terms) if terms else None
