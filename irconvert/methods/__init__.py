"""Binarization methods: one class each (base.py's interface), registered by name.

A new method is one file: a `Binarizer` subclass and a `register_method` call (see
tests/user_method.py); a recipe names it `binarize.method: "my_module:MyMethod"`, Python passes
`binarize(model, method=MyMethod())`. The papers' parts: `libra` (Libra-PB), `ede` (EDE),
`sdbnn` (SD-BNN's shifts), `scaled` (trained scaling factors), `quantizers` (STE, ApproxSign);
`presets` combines them into irconvert's own methods.
"""

from .base import Binarizer
from .registry import METHODS, get_method, method_spec, register_method
from . import presets  # noqa: F401,E402  (registers the built-in methods)

__all__ = ["Binarizer", "METHODS", "get_method", "method_spec", "register_method"]
