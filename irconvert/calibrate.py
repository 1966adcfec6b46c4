"""Calibration: measure what every W1A1 layer's input bits carry, and fix the layers whose bits are
constant.

A W1A1 layer computes on B_a = sign(a) (IR-Net Eq. 3). If a is never negative, as after a ReLU and
after any product, sum or softmax-weighted mix of ReLU outputs (SE's x * sigmoid(.), SK's
sum(x_i * softmax_i), attn @ v), then B_a = +1 everywhere: the layer's output no longer depends on
its input, and its EDE gradient flows back through a constant. The static analysis catches a ReLU
that feeds a layer directly; calibration catches the rest by running the converted model once:

    share(l) = mean(B_a(l) == +1)   over a calibration batch, for every W1A1 layer l

A layer is one-signed when share <= LIVE or share >= 1 - LIVE. The fix, in order:
  1. replace the ReLU-family modules that reach it through products, sums, concatenations and
     splits (`LayerFacts.sources`) by Hardtanh(-1, 1), as the plan does for direct feeders;
  2. if it is still one-signed (a sigmoid gate, a softmax, a functional relu), make it W1A32 and
     warn, naming the layer and the reason.
The shares after the fixes are kept in `Plan.live`, which `summary` shows per layer.

The batch runs in training mode (BatchNorm on batch statistics, as in fine-tuning) without gradient;
the BatchNorm running statistics and the random number generator are restored afterwards.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import torch
from torch import nn

from .analyze import Analysis
from .layers import BinaryMixin
from .plan import LayerPlan, Plan

LIVE = 1e-3  # a W1A1 input with fewer than 0.1% of its bits of one sign is as good as constant

Batch = Union[torch.Tensor, Sequence[torch.Tensor]]


@torch.no_grad()
def input_shares(model: nn.Module, batch: Batch) -> dict[str, float]:
    """Return {W1A1 layer: share of +1 bits of its binarized input} over one forward of `batch`."""
    counts: dict[str, list[float]] = {}

    def hook(name):
        def fn(mod, args):
            bits = mod.binarizer.activation(args[0], mod)
            c = counts.setdefault(name, [0.0, 0.0])
            c[0] += float((bits > 0).sum())
            c[1] += bits.numel()
        return fn

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, BinaryMixin) and m.binary_mode == "W1A1"]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    was = model.training
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    args = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)
    try:
        with torch.random.fork_rng(devices=[]):
            model.train()(*(a.to(dev) for a in args))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
        for k, v in model.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])
    return {n: c[0] / max(c[1], 1) for n, c in counts.items()}


def one_signed(share: float) -> bool:
    """True if a share of +1 bits leaves the input almost constant."""
    return share <= LIVE or share >= 1 - LIVE


def calibrate(model: nn.Module, analysis: Analysis, batch: Batch) -> tuple[Plan, list[str]]:
    """Fix the one-signed W1A1 inputs of binarized `model` in place; return (its new plan, warnings)."""
    the_plan: Plan = model.irconvert_plan
    shares = input_shares(model, batch)
    dead = [n for n, s in shares.items() if one_signed(s)]
    hardtanh = set(the_plan.hardtanh)
    new = sorted({r for n in dead for r in analysis.layers[n].sources} - hardtanh)
    for name in new:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Hardtanh(-1.0, 1.0))
    if new:
        shares = input_shares(model, batch)
    layers = dict(the_plan.layers)
    warnings = []
    for name in dead:
        if not one_signed(shares[name]):
            continue
        module = model.get_submodule(name)
        module.binary_mode = "W1A32"
        why = ("no ReLU reaches it that a Hardtanh could replace (a sigmoid or softmax gate, a functional relu)"
               if not analysis.layers[name].sources else "it stays so with Hardtanh in place of its ReLUs")
        lp = layers[name]
        layers[name] = LayerPlan(name, "W1A32", f"{lp.reason}; W1A32 as its input was one-signed", lp.gain)
        warnings.append(f"{name}: W1A32, as {100 * shares[name]:.1f}% of its input bits were +1 on the "
                        f"calibration batch and {why}")
        shares.pop(name)
    fixed = dataclasses.replace(the_plan, layers=layers, hardtanh=tuple(sorted(hardtanh | set(new))),
                                live=shares)
    return fixed, warnings
