"""Binarization methods: how a binary layer turns its latent weight and its input into signs.

A method is a small immutable object with two functions, `weight(w, layer)` and
`activation(x, layer)`, plus `exponent(w)` for the exporter. The converter, trainer and exporter
only call these, so a method from the literature is added by writing one class and naming it in
`METHODS` (or by passing an instance to the policy), never by touching them.

The four IR-Net presets are the cells of the paper's ablation (Table 1 of Qin et al., CVPR 2020):

    name      weights                           gradient of sign
    vanilla   B = sign(w), no scale             clipped STE, 1{|x| <= 1}
    libra     Libra-PB: s * sign(w_hat)         clipped STE
    ede       B = sign(w), no scale             EDE, k * t * (1 - tanh^2(t x))
    irnet     Libra-PB: s * sign(w_hat)         EDE   (the paper's method)

Activations are sign(x) with sign(0) = +1 and no scale in every preset; they get the same gradient
estimator as the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from . import libra
from .ede import ede_sign, sign
from .errors import IRConvertError
from .quantizers import ste_sign


@dataclass(frozen=True)
class Binarizer:
    """A sign binarizer: `balance` picks Libra-PB weights, `estimator` the gradient ('ede' or 'ste')."""

    name: str
    balance: bool
    estimator: str

    def _sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        if self.estimator == "ede":
            return ede_sign(x, layer.ede_t, layer.ede_k)
        return ste_sign(x)

    def weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the effective binary weight s * B used in the forward pass."""
        if not self.balance:
            return self._sign(w, layer)
        w_hat = libra.balance(w)
        s = libra.pow2(libra.scale_exponent(w_hat), w_hat)
        return (self._sign(w_hat, layer) * s).to(w.dtype)

    def activation(self, x: torch.Tensor, layer) -> torch.Tensor:
        """Return B_a = sign(x), no scale."""
        return self._sign(x, layer)

    def exponent(self, w: torch.Tensor) -> torch.Tensor:
        """Return the per-channel int exponent e of s = 2^e (0 where the method has no scale)."""
        if not self.balance:
            return torch.zeros(w.shape[0], dtype=torch.int32)
        return libra.scale_exponent(libra.balance(w))

    def signs(self, w: torch.Tensor) -> torch.Tensor:
        """Return the weight signs B in {-1, +1} that the forward pass uses (no scale)."""
        return sign(libra.balance(w) if self.balance else w.float())


METHODS: Mapping[str, Binarizer] = {
    "irnet": Binarizer("irnet", balance=True, estimator="ede"),
    "vanilla": Binarizer("vanilla", balance=False, estimator="ste"),
    "libra": Binarizer("libra", balance=True, estimator="ste"),
    "ede": Binarizer("ede", balance=False, estimator="ede"),
}


def get_method(method: "str | Binarizer") -> Binarizer:
    """Return the Binarizer named `method` (or `method` itself if it already is one)."""
    if not isinstance(method, str):
        return method
    try:
        return METHODS[method]
    except KeyError:
        raise IRConvertError(
            f"binarize.method: unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}"
        ) from None
