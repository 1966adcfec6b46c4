"""A binarization method written outside irconvert, as a user would: one class, one register_method.

XNOR-Net's weight scale (Rastegari et al., ECCV 2016): s_o = mean|w_o| per output channel, computed
from the weights (not trained), times sign(w); inputs are plain signs; both with the clipped STE.
"""

import torch

from irconvert.methods import Binarizer, register_method


class XNORMean(Binarizer):
    """y = (s_o * sign(w)) (*) sign(a), s_o = mean|w_o|."""

    name = "xnor_mean"

    def scale(self, w_hat: torch.Tensor, layer) -> torch.Tensor:
        s = w_hat.detach().abs().reshape(w_hat.shape[0], -1).mean(dim=1)
        return s.reshape((-1,) + (1,) * (w_hat.dim() - 1))

    def deploy_scale(self, w: torch.Tensor, layer) -> torch.Tensor:
        # the forward's s times the layer's gain 2^g (exact: a power of two)
        return self.scale(w, layer).reshape(-1).float() * 2.0**layer.binary_gain


register_method(XNORMean)
