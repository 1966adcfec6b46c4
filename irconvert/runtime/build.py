"""Load a packed.safetensors model with its W1A1 binary layers executed by the bitwise kernels.

`load(path)` rebuilds the model exactly as irconvert.load_packed does (the float simulation), then
swaps each binary layer that the kernel can run for a BitwiseConv2d / BitwiseLinear holding the
file's packed words repacked to 64-bit words per kernel tap. The others stay on the float path:

- W1A32 layers (the input is not binarized, so there is nothing to xor);
- subclasses with a forward of their own (timm's StdConv2d standardizes the weight, Conv2dSame pads
  dynamically, ...): only a layer whose class is BinaryMixin followed directly by nn.Conv2d or
  nn.Linear is taken over, since only there the forward is known to be the plain operator;
- padding modes other than 'zeros', layers with hooks.

A layer with an input threshold (SD-BNN) binarizes x - threshold, which has the sign of the
threshold compare exactly; a float (trained) scale multiplies the integer dot once.

A Bi-Real shortcut (irconvert.shortcut) keeps working: the twin keeps its real-valued input for
the BatchNorm after it, as the binary conv did.

Then (the default, `fuse=True`) the plan is built from the model's torch.fx graph (runtime/fuse.py):
each bitwise conv takes in the BatchNorm, residual sum and Hardtanh / ReLU after it, and writes
packed bits where the next layers are binary, which read them as they are. The result is a
torch.fx GraphModule; a model that does not trace stays the module above, unfused.

`model.irconvert_runtime` maps every binary layer's name to 'bitwise' or the reason it stayed
float; its `.fusion` maps each bitwise conv to what was fused into it, or why not.
"""

from __future__ import annotations

import os
import types
from typing import Optional

import torch
from torch import nn

from ..errors import IRConvertError
from ..layers import BinaryMixin
from ..verify import load_packed
from . import kernels
from .fuse import RuntimeReport, fuse as fuse_graph
from .layers import BitwiseConv2d, BitwiseLinear, refuse_train

_TWINS = {nn.Conv2d: BitwiseConv2d, nn.Linear: BitwiseLinear}


def float_reason(m: nn.Module) -> Optional[str]:
    """Return why binary layer `m` stays on the float path, or None if the bitwise kernel can run it."""
    mro = type(m).__mro__
    if len(mro) < 3 or mro[1] is not BinaryMixin or mro[2] not in _TWINS:
        base = mro[2].__name__ if mro[1] is BinaryMixin else mro[0].__name__
        return f"{base} is not a plain nn.Conv2d / nn.Linear (its forward may differ)"
    if not m.binary_frozen:
        return "not frozen (a latent, trainable layer)"
    if m.binary_mode != "W1A1":
        return f"{m.binary_mode}: the input is not binarized"
    if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if m._parameters["weight"].dtype != torch.float32:
        return f"weight dtype {m._parameters['weight'].dtype}"
    if m._forward_hooks or m._forward_pre_hooks:
        return "has forward hooks"
    return None


def load(path: os.PathLike | str, model: Optional[nn.Module] = None, fuse: bool = True) -> nn.Module:
    """Return the packed model with every W1A1 plain Conv2d / Linear replaced by its bitwise twin, the
    float ops after the convs fused into them unless `fuse` is False."""
    from safetensors import safe_open

    net = load_packed(path, model)
    report, twins = RuntimeReport(), {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        for name, m in list(net.named_modules()):
            if not isinstance(m, BinaryMixin):
                continue
            why = float_reason(m)
            if why is None:
                try:
                    bits = f.get_tensor(f"{name}.weight.bits")
                    scale = (kernels.scale_of(f.get_tensor(f"{name}.weight.exp")) if f"{name}.weight.exp" in keys
                             else f.get_tensor(f"{name}.weight.scale").float())
                except Exception:  # load_packed has read them already: only a file changed since can fail
                    raise IRConvertError(f"{path}: packed weight of layer {name} is missing; export it again") from None
                twin = twins[id(m)] = _TWINS[type(m).__mro__[2]].from_binary(m, bits, scale)
                if not name:  # the model is a single binary layer
                    return twin.eval()
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, twin)
            report[name] = why or "bitwise"
    for m in net.modules():  # a Bi-Real BatchNorm holds its conv as a plain attribute: point it at the twin
        conv = getattr(m, "bireal_conv", None)
        if conv is not None and id(conv) in twins:
            object.__setattr__(m, "bireal_conv", twins[id(conv)])
    net.eval()
    if fuse:
        net = fuse_graph(net, report)
    net.irconvert_runtime = report
    net.train = types.MethodType(refuse_train, net)  # refuse before any submodule's mode changes
    return net
