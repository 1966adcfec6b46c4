"""irconvert's own methods, each a class that lists the papers' parts it combines:

    name        weight signs of             scale                       input signs of   gradient of sign
    vanilla     w                           none                        a                clipped STE, 1{|x| <= 1}
    libra       w_hat (Libra-PB)            2^round(log2 mean|w_hat|)   a                clipped STE
    ede         w                           none                        a                EDE, k t (1 - tanh^2(t x))
    irnet       w_hat (Libra-PB)            2^round(...)                a                EDE   (IR-Net, the paper's method)
    sdbnn       w + d_w (WSD)               none                        a + d_a (ASD)    clipped STE   (SD-BNN)
    sdbnn_ede   w + d_w                     none                        a + d_a          EDE   (SD-BNN with IR-Net's backward)
    irnet_sd    w_hat + d_w                 2^round(...)                a + d_a          EDE   (IR-Net with SD-BNN's shifts)
    scaled      w                           alpha_o * beta, trained     a                STE (w), ApproxSign (a), L2 on alpha
    irnet_scaled  w_hat                     alpha_o * beta, trained     a                EDE, L2 on alpha

IR-Net: Qin et al., CVPR 2020 (libra.py, ede.py). SD-BNN: Xue et al., 2021 (sdbnn.py). Trained
scaling factors: Xu and Cheung, BMVC 2019 (scaled.py). sign(0) = +1 everywhere. A class's parts are
read left to right: the first one that defines a step gives it.
"""

from __future__ import annotations

from .base import Binarizer
from .ede import EDE
from .libra import LibraPB
from .registry import register_method
from .scaled import TrainedScale
from .sdbnn import SelfDistribution


class Vanilla(Binarizer):
    """Plain sign, clipped straight-through estimator, no scale (BinaryNet)."""

    name = "vanilla"


class Libra(LibraPB, Binarizer):
    """Libra-PB's balanced weights and power-of-two scale, with the clipped STE (IR-Net's ablation cell)."""

    name = "libra"


class EDEOnly(EDE, Binarizer):
    """Plain sign with EDE's backward (IR-Net's ablation cell)."""

    name = "ede"


class IRNet(EDE, LibraPB, Binarizer):
    """IR-Net: Libra-PB forward, EDE backward."""

    name = "irnet"


class SDBNN(SelfDistribution, Binarizer):
    """SD-BNN: learned sign shifts of weights and inputs, no scale, clipped STE."""

    name = "sdbnn"


class SDBNNEDE(EDE, SelfDistribution, Binarizer):
    """SD-BNN's forward with EDE's backward."""

    name = "sdbnn_ede"


class IRNetSD(EDE, SelfDistribution, LibraPB, Binarizer):
    """IR-Net with SD-BNN's shifts on Libra-PB's w_hat."""

    name = "irnet_sd"


class Scaled(TrainedScale, Binarizer):
    """Trained scaling factors alpha_o * beta, ApproxSign on the input, STE on the weights, L2 on alpha."""

    name = "scaled"


class IRNetScaled(EDE, TrainedScale, LibraPB, Binarizer):
    """Trained alpha_o * beta on Libra-PB's signs, EDE backward."""

    name = "irnet_scaled"


for _cls in (IRNet, Vanilla, Libra, EDEOnly, SDBNN, SDBNNEDE, IRNetSD, Scaled, IRNetScaled):
    register_method(_cls)
