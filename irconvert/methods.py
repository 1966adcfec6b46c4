"""Binarization methods: how a binary layer turns its latent weight and its input into signs.

A method is a small immutable object. The converter, trainer and exporter only call its functions:

    init(layer)          register the method's own trainable parameters on a new binary layer
    weight(w, layer)     the effective binary weight used in the forward pass
    activation(x, layer) the binarized input (W1A1)
    penalty(layer)       a term added to the training loss (or None)
    deploy(layer)        what the packed file stores: signs, per-channel scale, input threshold

so a method from the literature is added by writing one Binarizer (or a subclass) and naming it in
`METHODS`, never by touching them. The presets are combinations of these parts:

    name        weight signs of             scale                 input signs of     gradient of sign
    vanilla     w                           none                  a                  clipped STE, 1{|x| <= 1}
    libra       w_hat (Libra-PB)            2^round(log2 mean|w_hat|)  a             clipped STE
    ede         w                           none                  a                  EDE, k t (1 - tanh^2(t x))
    irnet       w_hat (Libra-PB)            2^round(...)          a                  EDE   (IR-Net, the paper's method)
    sdbnn       w + d_w (WSD)               none                  a + d_a (ASD)      clipped STE   (SD-BNN)
    sdbnn_ede   w + d_w                     none                  a + d_a            EDE   (SD-BNN with IR-Net's backward)
    irnet_sd    w_hat + d_w                 2^round(...)          a + d_a            EDE   (IR-Net with SD-BNN's shifts)
    scaled      w                           alpha_o * beta, trained  a               STE (w), ApproxSign (a), L2 on alpha
    irnet_scaled  w_hat                     alpha_o * beta, trained  a               EDE, L2 on alpha

IR-Net: Qin et al., CVPR 2020 (libra.py, ede.py). SD-BNN: Xue et al., 2021 (sdbnn.py). Trained
scaling factors: Xu and Cheung, BMVC 2019 (scaled.py). sign(0) = +1 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional

import torch

from . import libra, scaled, sdbnn
from .ede import ede_sign
from .ops import sign
from .errors import IRConvertError
from .quantizers import approx_sign, ste_sign

Estimator = Literal["ste", "ede", "approx"]


@dataclass(frozen=True)
class Binarizer:
    """A sign binarizer assembled from the parts of the literature.

    balance: Libra-PB's standardized weights w_hat; scale: 'none', 'pow2' (Libra-PB's detached
    2^round(log2 mean|w_hat|), needs balance) or 'trained' (alpha_o * beta); shift: SD-BNN's learned
    d_w, d_a; estimator: the gradient of sign for the activations, and for the weights unless
    weight_estimator says otherwise; scale_l2: lambda of the L2 term on trained weight scales.
    """

    name: str
    balance: bool = False
    estimator: Estimator = "ste"
    weight_estimator: Optional[Estimator] = None
    scale: Literal["none", "pow2", "trained"] = "none"
    shift: bool = False
    scale_l2: float = 0.0

    def _sign(self, x: torch.Tensor, layer, estimator: str) -> torch.Tensor:
        if estimator == "ede":
            return ede_sign(x, layer.ede_t, layer.ede_k)
        return approx_sign(x) if estimator == "approx" else ste_sign(x)

    def _latent(self, w: torch.Tensor, layer) -> torch.Tensor:
        """The real values whose signs are the weight bits: w or w_hat, shifted by d_w under SD-BNN."""
        w = libra.balance(w) if self.balance else w
        return sdbnn.shift_weight(w, layer) if self.shift else w

    def init(self, layer) -> tuple[str, ...]:
        """Register this method's trainable parameters on binary `layer`; return their names."""
        latent = layer._parameters["weight"]
        w1a1 = layer.binary_mode == "W1A1"
        names = sdbnn.add_shifts(layer, latent, w1a1) if self.shift else ()
        if self.scale == "trained":
            # alpha multiplies the layer's fixed gain 2^g: it starts at mean|w| / 2^g, so alpha * 2^g = mean|w|
            base = libra.balance(latent.detach()) if self.balance else latent
            names += scaled.add_scales(layer, base, w1a1, 1.0 if self.balance else 2.0**layer.binary_gain)
        return names

    def _scale(self, w_hat: torch.Tensor, layer) -> Optional[torch.Tensor]:
        """The per-output-channel factor of the signs (None for no scale), shaped to broadcast over w."""
        shape = (-1,) + (1,) * (w_hat.dim() - 1)
        if self.scale == "pow2":
            return libra.pow2(libra.scale_exponent(w_hat), w_hat)
        if self.scale == "trained":
            return scaled.channel_scale(layer).reshape(shape)
        return None

    def weight(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the effective binary weight (scale * B) used in the forward pass."""
        w_hat = libra.balance(w) if self.balance else w
        b = self._sign(sdbnn.shift_weight(w_hat, layer) if self.shift else w_hat, layer,
                       self.weight_estimator or self.estimator)
        s = self._scale(w_hat, layer)
        return b if s is None else (b * s).to(w.dtype)

    def activation(self, x: torch.Tensor, layer) -> torch.Tensor:
        """Return B_a = sign(x), or sign(x + d_a) under SD-BNN; no scale (a trained beta sits on the weight side)."""
        return self._sign(sdbnn.shift_input(x, layer) if self.shift else x, layer, self.estimator)

    def penalty(self, layer) -> Optional[torch.Tensor]:
        """Return the method's loss term for `layer` (L2 on trained weight scales), or None."""
        if self.scale == "trained" and self.scale_l2:
            return scaled.l2(layer, self.scale_l2)
        return None

    def signs(self, w: torch.Tensor, layer) -> torch.Tensor:
        """Return the weight signs B in {-1, +1} that the forward pass uses (no scale)."""
        return sign(self._latent(w.float(), layer))

    def exponent(self, w: torch.Tensor) -> torch.Tensor:
        """Return the per-channel int exponent e of Libra-PB's s = 2^e (0 where the method has no such scale)."""
        if self.scale != "pow2":
            return torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return libra.scale_exponent(libra.balance(w))

    @torch.no_grad()
    def deploy(self, layer) -> dict[str, Optional[torch.Tensor]]:
        """Return what deployment needs of `layer`: 'signs' (weight shape), 'scale' float32 [out] (the
        whole per-channel factor, the gain 2^g included) and 'threshold' float32 [in channels] or None."""
        w = layer.latent_weight.detach()
        gain = 2.0**layer.binary_gain
        if self.scale == "trained":
            # the same float32 product as the forward pass, so the stored weight is bit-identical
            s = scaled.channel_scale(layer).detach().float() * gain
        else:
            s = torch.ldexp(torch.ones(w.shape[0], device=w.device), self.exponent(w) + layer.binary_gain)
        shifted = self.shift and layer.binary_mode == "W1A1"
        return {"signs": self.signs(w, layer), "scale": s, "threshold": sdbnn.threshold(layer) if shifted else None}


METHODS: Mapping[str, Binarizer] = {
    "irnet": Binarizer("irnet", balance=True, estimator="ede", scale="pow2"),
    "vanilla": Binarizer("vanilla"),
    "libra": Binarizer("libra", balance=True, scale="pow2"),
    "ede": Binarizer("ede", estimator="ede"),
    "sdbnn": Binarizer("sdbnn", shift=True),
    "sdbnn_ede": Binarizer("sdbnn_ede", estimator="ede", shift=True),
    "irnet_sd": Binarizer("irnet_sd", balance=True, estimator="ede", scale="pow2", shift=True),
    "scaled": Binarizer("scaled", estimator="approx", weight_estimator="ste", scale="trained", scale_l2=1e-4),
    "irnet_scaled": Binarizer("irnet_scaled", balance=True, estimator="ede", scale="trained", scale_l2=1e-4),
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
