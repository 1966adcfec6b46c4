"""The method interface: how a binary layer turns its latent weight and its input into signs.

A method is one class, a subclass of `Binarizer`, registered by name with `register_method`. The
converter, trainer and exporter call only these:

    init(layer)          register the method's own trainable parameters on a new binary layer
    weight(w, layer)     the effective binary weight s * B used in the forward pass
    activation(x, layer) the binarized input (W1A1)
    penalty(layer)       a term added to the training loss (or None)
    deploy(layer)        what the packed file stores: signs, per-channel scale, input threshold

and `weight`, `activation` and `deploy` are built from smaller steps a method overrides:

    standardize(w)  -> w_hat        the real values the scale is computed from (Libra-PB: balanced)
    shift_weight(w_hat) -> latent   the real values whose signs are the weight bits (SD-BNN: + d_w)
    weight_sign / input_sign        sign with the method's gradient (default: the clipped STE)
    scale(w_hat)    -> s or None    the per-output-channel factor of the signs, in the forward pass
    shift_input(x)                  before the input's sign (SD-BNN: + d_a)

The base class alone is the `vanilla` method: B = sign(w), B_a = sign(a), no scale, clipped STE.
Papers' parts are mixins in this package (libra, ede, sdbnn, scaled); a preset is a class that
lists them, e.g. `class IRNet(EDE, LibraPB, Binarizer)`.
"""

from __future__ import annotations

import functools
from typing import ClassVar, Optional

import torch

from ..fused import binary_sign
from ..ops import sign
from .ede import mode_tk
from .quantizers import ste_sign


class Binarizer:
    """A sign binarizer; subclass it (or its mixins) and `register_method` the class to add a method."""

    name: ClassVar[str] = "vanilla"
    # the fused sign's mode ("ste", "ede", "approx") that this class's own weight_sign runs; a class that
    # overrides weight_sign without setting it here gets the unfused weight path
    weight_sign_mode: ClassVar[Optional[str]] = "ste"
    input_sign_mode: ClassVar[Optional[str]] = "ste"  # the same for this class's own input_sign

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    # --- the steps a method overrides -------------------------------------------------------
    def init(self, layer) -> tuple[str, ...]:
        """Register this method's trainable parameters on binary `layer`; return their names."""
        return ()

    def standardize(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the real weights the scale is computed from (w itself by default)."""
        return w

    def shift_weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the real values whose signs are the weight bits (w_hat itself by default)."""
        return w

    def shift_input(self, x: torch.Tensor, layer) -> torch.Tensor:
        """Return the real values whose signs are the input bits (x itself by default)."""
        return x

    def weight_sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        """sign of the weights with this method's gradient (the clipped STE by default)."""
        return ste_sign(x)

    def input_sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        """sign of the input with this method's gradient (the clipped STE by default)."""
        return ste_sign(x)

    def scale(self, w_hat: torch.Tensor, layer) -> Optional[torch.Tensor]:
        """Return the per-output-channel factor of the signs shaped to broadcast over w, or None (no scale)."""
        return None

    def magnitude(self, layer) -> float:
        """Return the spread of the standardized weight relative to the layer's gain 2^g (2^g: w itself)."""
        return 2.0**layer.binary_gain

    def exponent(self, w: torch.Tensor) -> torch.Tensor:
        """Return the per-channel int exponent e of a power-of-two scale 2^e (0: no such scale)."""
        return torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)

    def deploy_scale(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the whole per-channel factor float32 [out] the packed file stores, the gain 2^g included."""
        return torch.ldexp(torch.ones(w.shape[0], device=w.device), self.exponent(w) + layer.binary_gain)

    def threshold(self, layer) -> Optional[torch.Tensor]:
        """Return the input threshold tau [in channels] (B_a = +1 where a >= tau), or None for 0."""
        return None

    def penalty(self, layer) -> Optional[torch.Tensor]:
        """Return the method's loss term for `layer`, or None."""
        return None

    # --- what the converter, trainer and exporter call --------------------------------------
    def weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the effective binary weight (scale * B) used in the forward pass."""
        w_hat = self.standardize(w, layer)
        b = self.weight_sign(self.shift_weight(w_hat, layer), layer)
        s = self.scale(w_hat, layer)
        return b if s is None else (b * s).to(w.dtype)

    def activation(self, x: torch.Tensor, layer) -> torch.Tensor:
        """Return B_a, the binarized input (no scale: a trained one sits on the weight side)."""
        return self.input_sign(self.shift_input(x, layer), layer)

    def signs(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the weight signs B in {-1, +1} that the forward pass uses (no scale)."""
        w = w.float()
        return sign(self.shift_weight(self.standardize(w, layer), layer))

    @torch.no_grad()
    def deploy(self, layer) -> dict[str, Optional[torch.Tensor]]:
        """Return what deployment needs of `layer`: 'signs' (weight shape), 'scale' float32 [out] (the
        whole per-channel factor, the gain 2^g included) and 'threshold' float32 [in channels] or None."""
        w = layer.latent_weight.detach()
        return {"signs": self.signs(w, layer), "scale": self.deploy_scale(w, layer), "threshold": self.threshold(layer)}


@functools.lru_cache(maxsize=None)
def plain_input_mode(cls: type) -> Optional[str]:
    """Return the fused sign mode of `cls`'s activation if it is that op on the input itself (no shift, no
    threshold), else None (once per class: every forward of every layer asks)."""
    if (cls.activation is not Binarizer.activation or cls.shift_input is not Binarizer.shift_input
            or cls.threshold is not Binarizer.threshold):
        return None
    return declared_mode(cls, "input_sign")


@functools.lru_cache(maxsize=None)
def declared_mode(cls: type, op: str) -> Optional[str]:
    """Return the `{op}_mode` (fused sign mode) that the class defining `cls`'s method `op` declares, or None
    (once per class: RSign's activation asks at every forward)."""
    owner = next(k for k in cls.__mro__ if op in vars(k))
    return vars(owner).get(f"{op}_mode")


def clipped_sign(x: torch.Tensor, layer) -> torch.Tensor:
    """Return sign(hardtanh(x)) = sign(x) with the layer's input-sign gradient times Hardtanh(-1, 1)'s: a
    Hardtanh in front of the layer fused into the sign (swap.fuse_hardtanh; plain_input_mode methods only)."""
    mode = plain_input_mode(type(layer.binarizer))
    return binary_sign(x, mode, mode_tk(layer, mode, x.device), clip=True)
