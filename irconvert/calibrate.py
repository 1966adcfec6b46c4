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
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .analyze import Analysis
from .layers import BinaryMixin, set_mode
from .plan import Plan

LIVE = 1e-3  # a W1A1 input with fewer than 0.1% of its bits of one sign is as good as constant

Batch = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class InputStats:
    """What one W1A1 layer's input looked like on the calibration batch."""

    share: float  # of +1 bits
    varying: float  # of input positions whose bit differs between samples (1.0 for a batch of one)
    std: float  # of the real-valued input


@torch.no_grad()
def input_stats(model: nn.Module, batch: Batch) -> dict[str, InputStats]:
    """Return the InputStats of every W1A1 layer of `model` over one forward of `batch`."""
    sums: dict[str, list[float]] = {}

    def hook(name):
        def fn(mod, args):
            x = args[0]
            bits = mod.binarizer.activation(x, mod) > 0
            flat = bits.reshape(bits.shape[0], -1) if bits.dim() > 1 and bits.shape[0] > 1 else None
            differ = float((flat != flat[:1]).any(0).sum()) if flat is not None else float(bits[0].numel())
            c = sums.setdefault(name, [0.0] * 5)
            for i, v in enumerate((float(bits.sum()), bits.numel(), differ, bits[0].numel(), float(x.float().std()))):
                c[i] += v
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
    return {n: InputStats(c[0] / max(c[1], 1), c[2] / max(c[3], 1), c[4]) for n, c in sums.items()}


def dead(stats: InputStats) -> Optional[str]:
    """Return why an input's bits carry (almost) nothing, or None if they are live."""
    if stats.share <= LIVE or stats.share >= 1 - LIVE:
        return f"{100 * stats.share:.1f}% of its input bits were +1"
    if stats.varying <= LIVE:
        return "its input bits were the same for every sample (a pooled input under a BatchNorm sees zero variance)"
    return None


def calibrate(model: nn.Module, analysis: Analysis, batch: Batch) -> tuple[Plan, list[str]]:
    """Fix the dead W1A1 inputs of binarized `model` in place; return (its new plan, warnings)."""
    the_plan: Plan = model.irconvert_plan
    stats = input_stats(model, batch)
    hardtanh = set(the_plan.hardtanh)
    signed = [n for n, st in stats.items() if st.share <= LIVE or st.share >= 1 - LIVE]
    # a policy that says hardtanh: false keeps its ReLUs: its one-signed layers go straight to W1A32
    keep_relus = the_plan.policy.hardtanh is False
    new = [] if keep_relus else sorted({r for n in signed for r in analysis.layers[n].sources} - hardtanh)
    for name in new:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Hardtanh(-1.0, 1.0))
    if new:
        stats = input_stats(model, batch)
    layers = dict(the_plan.layers)
    warnings = []
    for name, st in list(stats.items()):
        why = dead(st)
        if why is not None:
            how = ("" if name not in signed else "; the policy keeps its ReLUs (hardtanh: false)"
                   if keep_relus else "; it stays so with Hardtanh in place of its ReLUs"
                   if analysis.layers[name].sources else
                   "; no ReLU reaches it that a Hardtanh could replace (a sigmoid or softmax gate, a functional relu)")
            set_mode(model.get_submodule(name), "W1A32")
            lp = layers[name]
            layers[name] = dataclasses.replace(lp, mode="W1A32", reason=f"{lp.reason}; W1A32 as its input bits were dead")
            warnings.append(f"{name}: W1A32, as {why} on the calibration batch{how}")
            del stats[name]
            continue
        # EDE's k * t = 1 passes dL/dB unscaled, as if B had the scale of a. For an input wider than
        # the unit scale IR-Net assumes (a BatchNorm output) that overstates the gradient by std(a),
        # and a BatchNorm after the layer does not take it back: in a residual stack of such layers
        # it compounds (ConvMixer: x1.4 a block, 3e5 over 32). EDE on a / std(a) removes it; a
        # narrower input (after Hardtanh) keeps the plain estimator, whose clipping it already has.
        scale = min(1.0, 1.0 / st.std) if st.std > 0 and math.isfinite(st.std) else 1.0
        layers[name] = dataclasses.replace(layers[name], grad_scale=scale)
        model.get_submodule(name).input_grad_scale = scale
    fixed = dataclasses.replace(the_plan, layers=layers, hardtanh=tuple(sorted(hardtanh | set(new))),
                                live={n: st.share for n, st in stats.items()})
    return fixed, warnings
