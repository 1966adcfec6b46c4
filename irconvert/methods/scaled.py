"""Trainable scaling factors (Xu and Cheung, "Accurate and Compact Convolutional Neural Networks with
Trained Binarization", BMVC 2019, arXiv:1909.11366).

XNOR-Net computes its scaling factors from the weights; here they are parameters, trained by
backpropagation with everything else, for the weights and for the activations:

    w_b = alpha_o * sign(w_o)        alpha: one trainable factor per output channel o
    a_b = beta * sign(a)             beta: one trainable factor per layer
    y   = w_b (*) a_b = (alpha_o * beta) * (sign(w) (*) sign(a))
    dsign(a)/da ~ max(0, 2 - 2|a|)   for the activations (weights: the clipped STE)
    loss += lambda/2 * sum(alpha^2)  L2 regularization of the weight scales

Since (*) is linear in each operand, beta is applied to the weight side (alpha_o * beta, one float
per output channel), where it gives the same output and the same gradients; the deployment file
stores that product as the layer's per-channel scale, so the activations stay pure signs.

Choices of ours, where the paper leaves room: alpha starts at mean|w_o| (XNOR-Net's closed form,
so a converted model starts from the best fixed scale) and beta at 1. The activation gradient is
the triangle 2 - 2|a| of Liu et al.'s ApproxSign (Bi-Real Net), the tight piecewise approximation of
sign's derivative that we read the paper to use; lambda defaults to 1e-4.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .quantizers import approx_sign


def add_scales(layer: nn.Module, latent: torch.Tensor, w1a1: bool, magnitude: float) -> tuple[str, ...]:
    """Register alpha [out] = mean|latent_o| / magnitude (and beta = 1 for W1A1) on `layer`; return their names."""
    alpha = latent.detach().reshape(latent.shape[0], -1).abs().mean(dim=1) / magnitude
    layer.weight_scale = nn.Parameter(alpha.to(latent.dtype))
    if not w1a1:
        return ("weight_scale",)
    layer.input_scale = nn.Parameter(torch.ones(1, dtype=latent.dtype, device=latent.device))
    return ("weight_scale", "input_scale")


def channel_scale(layer: nn.Module) -> torch.Tensor:
    """Return alpha_o * beta per output channel (alpha_o for W1A32), the one float that multiplies sign(w_o)."""
    beta = getattr(layer, "input_scale", None)
    return layer.weight_scale * beta if beta is not None else layer.weight_scale


def l2(layer: nn.Module, lam: float) -> torch.Tensor:
    """Return lambda/2 * sum(alpha^2), the regularization of the weight scales."""
    return 0.5 * lam * layer.weight_scale.float().square().sum()


class TrainedScale:
    """Trained scaling factors as a method part: alpha_o * beta on the signs, ApproxSign on the input,
    lambda/2 * sum(alpha^2) in the loss (lambda = `scale_l2`)."""

    scale_l2 = 1e-4

    def init(self, layer) -> tuple[str, ...]:
        names = super().init(layer)
        latent = layer._parameters["weight"]
        # alpha multiplies the layer's fixed gain 2^g: it starts at mean|w| / 2^g, so alpha * 2^g = mean|w|
        base = self.standardize(latent.detach(), layer)
        return names + add_scales(layer, base, layer.binary_mode == "W1A1", self.magnitude(layer))

    def scale(self, w_hat: torch.Tensor, layer) -> torch.Tensor:
        return channel_scale(layer).reshape((-1,) + (1,) * (w_hat.dim() - 1))

    input_sign_mode = "approx"  # the fused sign's mode of input_sign (see base.plain_input_mode)

    def input_sign(self, x: torch.Tensor, layer) -> torch.Tensor:
        return approx_sign(x)

    def deploy_scale(self, w: torch.Tensor, layer) -> torch.Tensor:
        # the same float32 product as the forward pass, so the stored weight is bit-identical
        return channel_scale(layer).detach().float() * 2.0**layer.binary_gain

    def penalty(self, layer) -> Optional[torch.Tensor]:
        return l2(layer, self.scale_l2) if self.scale_l2 else None
