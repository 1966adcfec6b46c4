"""irconvert: pretrained timm / torchvision models to IR-Net binary networks.

The package is the data's walk, one module per stage:
    load (models) -> analyze -> plan -> swap -> train -> pack -> write -> verify
with `run` (one whole recipe) and `cli` on top, the binarization methods in `methods/` (the papers'
parts: `methods.libra` for Libra-PB, `methods.ede` for EDE, ...), the binary layers in `layers`. The public names below load on first use, so that
`import irconvert` (and `irconvert --help`) does not import torch.
"""

from __future__ import annotations

import importlib

from .version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "ede_k": "methods.ede", "ede_t": "methods.ede",
    "IRConvertError": "errors",
    "BinaryConv2d": "layers", "BinaryLinear": "layers", "BinaryMixin": "layers",
    "binary_layers": "layers", "set_ede": "layers",
    "METHODS": "methods", "Binarizer": "methods", "register_method": "methods",
    "list_pretrained": "models", "pretrained": "models",
    "Policy": "plan",
    "summary": "layer_summary",
    "binarize": "swap",
    "load": "verify", "load_packed": "verify",
    "save_latent": "write", "save_packed": "write",
    "export_tflite": "tflite",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):  # a submodule: irconvert.verify.verify_file, irconvert.runtime.load
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'irconvert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
