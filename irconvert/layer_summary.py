"""A per-layer table of a (binarized) model, in the spirit of larq's `lq.models.summary`:
binary or not, parameters, bits per weight, memory, MACs; totals with the compression ratio and the
share of multiply-accumulates that are binary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .fileformat import WORD_BITS
from .layers import SUPPORTED, BinaryMixin


@dataclass(frozen=True)
class LayerRow:
    name: str
    type_name: str
    binary: str  # "W1A1", "W1A32" or "fp32"
    params: int
    bits_per_weight: float
    bytes: int
    macs: int
    plus_share: float | None = None  # W1A1: share of +1 bits of its input on the calibration batch (calibrate.py)


@dataclass(frozen=True)
class Summary:
    rows: list[LayerRow]
    params: int
    fp32_bytes: int
    binary_bytes: int
    macs: int
    binary_macs: int
    input_size: tuple[int, ...]

    @property
    def compression(self) -> float:
        return self.fp32_bytes / max(self.binary_bytes, 1)

    @property
    def binary_mac_share(self) -> float:
        return self.binary_macs / max(self.macs, 1)

    @property
    def w1a1_mac_share(self) -> float:
        """The share of the MACs that run bitwise (W1A1 layers; W1A32 ones have binary weights, real inputs)."""
        return sum(r.macs for r in self.rows if r.binary == "W1A1") / max(self.macs, 1)

    def to_dict(self) -> dict:
        """Return the totals (and rows) as plain JSON-ready values."""
        d = asdict(self)
        d.update(compression=self.compression, binary_mac_share=self.binary_mac_share)
        return d

    def __str__(self) -> str:
        # '+1 in' comes from the calibration batch: a model rebuilt from a file has none, and no such column
        plus = any(r.plus_share is not None for r in self.rows)
        head = (f"{'layer':<40} {'type':<16} {'binary':<6} {'params':>10} {'bits/w':>6} {'memory':>10} {'MACs':>12}"
                + (f" {'+1 in':>6}" if plus else ""))
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append((
                f"{r.name[:40]:<40} {r.type_name[:16]:<16} {r.binary:<6} {r.params:>10,} "
                f"{r.bits_per_weight:>6.2f} {_kib(r.bytes):>10} {r.macs:>12,} "
                + (f"{100 * r.plus_share:>5.1f}%" if r.plus_share is not None else "")
            ).rstrip())
        lines.append("-" * len(head))
        if plus:
            lines.append("+1 in: share of +1 bits of a W1A1 layer's input on the calibration batch")
        lines.append(f"parameters: {self.params:,}   MACs at input {self.input_size}: {self.macs:,}")
        lines.append(
            f"fp32 size: {_kib(self.fp32_bytes)}   with 1-bit weights: {_kib(self.binary_bytes)}   "
            f"compression: {self.compression:.2f}x   binary share of MACs: {100 * self.binary_mac_share:.1f}%"
        )
        return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024 * 1024 else f"{n / 2**20:,.2f} MiB"


def default_input_size(model: nn.Module) -> tuple[int, ...]:
    """Return (C, H, W): the size the model was calibrated or trained on (`irconvert_input_size`), else
    channels of the first conv and the size from timm's pretrained_cfg (else 224x224)."""
    seen = getattr(model, "irconvert_input_size", None)
    if seen:
        return tuple(seen)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # the stem may have been adapted to other channels
            return (m.in_channels,) + size[1:]
    return size


def summary(model: nn.Module, input_size: tuple[int, ...] | None = None) -> Summary:
    """Return the per-layer Summary of `model`, counting MACs with one forward pass of batch 1."""
    input_size = tuple(input_size or default_input_size(model))
    macs: dict[str, int] = {}

    def hook(name):
        def fn(mod, inp, out):
            w = mod._parameters["weight"]
            per_out = w[0].numel() if isinstance(mod, nn.modules.conv._ConvNd) else mod.in_features
            if isinstance(out, torch.Tensor):
                channels = out.shape[1] if isinstance(mod, nn.modules.conv._ConvNd) else out.shape[-1]
                macs[name] = macs.get(name, 0) + int(out.numel() // max(channels, 1) * w.shape[0] * per_out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, SUPPORTED)]
    was_training = model.training
    try:
        model.eval()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros((1,) + input_size, device=dev))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    live = getattr(getattr(model, "irconvert_plan", None), "live", None) or {}
    rows, counted = [], set()
    for name, m in model.named_modules():
        if not isinstance(m, SUPPORTED):
            continue
        w = m._parameters["weight"]
        bias = m._parameters.get("bias")
        nb = bias.numel() if isinstance(bias, torch.Tensor) else 0
        counted.update(id(p) for p in (w, bias) if isinstance(p, torch.Tensor))
        if isinstance(m, BinaryMixin):
            words = math.ceil(w[0].numel() / WORD_BITS)
            nbytes = w.shape[0] * (words * WORD_BITS // 8 + 1) + 4 * nb
            kind = m.binary_mode
        else:
            nbytes, kind = 4 * (w.numel() + nb), "fp32"
        rows.append(LayerRow(name, type(m).__name__, kind, w.numel() + nb, 8 * nbytes / (w.numel() + nb), nbytes,
                             macs.get(name, 0), live.get(name) if kind == "W1A1" else None))

    other = sum(t.numel() for t in list(model.parameters()) + list(model.buffers())
                if id(t) not in counted and t.is_floating_point())
    # a packed reload's layers hold what their method learned (RSign's alpha, a scale) folded into the weight
    # and the input threshold: the same parameters as the model that was trained and exported
    params = sum(p.numel() for p in model.parameters()) + sum(getattr(m, "frozen_params", 0) for m in model.modules())
    fp32 = 4 * other + sum(4 * r.params for r in rows)
    binary = 4 * other + sum(r.bytes for r in rows)
    total = sum(r.macs for r in rows)
    bmacs = sum(r.macs for r in rows if r.binary != "fp32")
    return Summary(rows, params, fp32, binary, total, bmacs, input_size)
