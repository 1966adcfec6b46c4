"""Feature distillation for the binary stage: attention transfer between teacher and student stages.

Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. The attention map of a
feature map A (N x C x H x W) is the channel mean of its squares, flattened and L2-normalized per
image,

    Q(A) = vec(mean_c A_c^2) / || vec(mean_c A_c^2) ||_2,

and the loss over matched layers l is beta * sum_l mean((Q(A_s^l) - Q(A_t^l))^2), the mean taken
over images and positions (the paper's reference code; beta=1000 there). A binary student converted
from the teacher has the teacher's layer names, so layer l of one matches layer l of the other.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import IRConvertError


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """Return Q(A): the per-image L2-normalized channel mean of A^2, flattened (N x H*W)."""
    return F.normalize(a.float().pow(2).mean(1).flatten(1), dim=1)


def attention_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return sum over the layers both dicts hold of mean((Q(A_s) - Q(A_t))^2)."""
    return sum((attention_map(student[k]) - attention_map(teacher[k])).pow(2).mean() for k in student)


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """Return the model's top-level nn.Sequential children that hold parameters (ResNet's layer1-4)."""
    return tuple(n for n, m in model.named_children()
                 if isinstance(m, nn.Sequential) and any(True for _ in m.parameters()))


class FeatureTap:
    """Keep the latest output of each named submodule (forward hooks); `close()` removes the hooks."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.out: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise IRConvertError(f"train.distill.attention_layers: {name!r} is not a module of the model; "
                                     "use names from model.named_modules(), e.g. layer1") from None
            self._handles.append(module.register_forward_hook(self._keep(name)))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.out[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
