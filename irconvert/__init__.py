"""irconvert: pretrained timm / torchvision models to IR-Net binary networks.

The package is the data's walk, one module per stage:
    load -> analyze -> plan -> swap -> train -> pack -> verify -> write
with the paper's parts in `libra` (Libra-PB) and `ede` (EDE), the binary layers in `layers`.
"""

__version__ = "0.1.0"

from .ede import ede_k, ede_t
from .errors import IRConvertError
from .layers import BinaryConv2d, BinaryLinear, BinaryMixin
from .methods import METHODS, Binarizer
from .plan import Policy
from .summary import summary
from .swap import binarize, binary_layers, set_ede
from .verify import load, load_packed
from .write import save_latent, save_packed
from . import runtime  # noqa: E402  (bitwise inference; its kernel builds on first use)

__all__ = [
    "BinaryConv2d", "BinaryLinear", "BinaryMixin", "Binarizer", "IRConvertError", "METHODS", "Policy",
    "binarize", "binary_layers", "load", "load_packed", "save_latent", "save_packed", "ede_k", "ede_t", "set_ede", "summary", "__version__",
]
