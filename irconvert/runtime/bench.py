"""Timings of the bitwise runtime against fp32, for `irconvert bench-runtime` and `python -m bench.runtime`.

Each row times an fp32 reference and its bitwise counterpart in one run, alternating the two call
by call (after warm-up), so that load from other processes falls on both alike; the numbers are
medians. Both get torch.get_num_threads() threads: torch's own for fp32, OpenMP for the kernel
(which keeps a layer too small to split on one, see kernels.py).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_summary import default_input_size
from ..ops import sign
from ..pack import binary_weight, fan_in_order, pack_signs
from . import kernels
from .build import load
from .layers import BitwiseConv2d, BitwiseLinear, bitwise_conv2d, bitwise_linear


def paired_ms(fp32: Callable[[], object], bitwise: Callable[[], object], repeat: int = 30,
              warmup: int = 5) -> tuple[list[float], list[float]]:
    """Return the milliseconds of each call of fp32() and bitwise(), called alternately `repeat` times each."""
    for _ in range(warmup):
        fp32(), bitwise()
    a, b = [], []
    for _ in range(repeat):
        for fn, out in ((fp32, a), (bitwise, b)):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return a, b


def _row(case: str, batch: int, times: tuple[list[float], list[float]], **extra) -> dict:
    """Return a result row: medians and their ratio, the minima (least disturbed by other processes)."""
    fp, bw = statistics.median(times[0]), statistics.median(times[1])
    return {"case": case, "batch": batch, "fp32_ms": round(fp, 4), "bitwise_ms": round(bw, 4),
            "speedup": round(fp / bw, 2), "fp32_min_ms": round(min(times[0]), 4),
            "bitwise_min_ms": round(min(times[1]), 4), "threads": torch.get_num_threads(),
            "backend": kernels.backend(), "isa": kernels.native_isa(), **extra}


def _random_packed(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (file bits, exponents, float weight s * B) of a random binary layer."""
    signs = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    exp = torch.randint(-4, 1, (shape[0],), dtype=torch.int8)
    bits = pack_signs(fan_in_order(signs))
    return bits, exp, binary_weight(bits, exp, shape)


@torch.no_grad()
def layer_rows(batches: tuple[int, ...] = (1, 8), repeat: int = 30) -> list[dict]:
    """Return rows for a 3x3 conv 256->256 on 14x14 and a 4096x4096 Linear, fp32 F.conv2d/F.linear vs bitwise."""
    torch.manual_seed(0)
    rows = []
    for batch in batches:
        bits, exp, w = _random_packed((256, 256, 3, 3))
        words, scale = kernels.conv_words(bits, tuple(w.shape)), kernels.scale_of(exp)
        x = torch.randn(batch, 256, 14, 14)
        xs = sign(x)  # fp32 gets the binarized input ready-made: only the conv itself is timed
        times = paired_ms(lambda: F.conv2d(xs, w, padding=1), lambda: bitwise_conv2d(x, words, scale, padding=1),
                          repeat)
        rows.append(_row("conv3x3 256->256 14x14", batch, times))
        bits, exp, w = _random_packed((4096, 4096))
        words, scale = kernels.linear_words(bits, tuple(w.shape)), kernels.scale_of(exp)
        x = torch.randn(batch, 4096)
        xs = sign(x)
        times = paired_ms(lambda: F.linear(xs, w), lambda: bitwise_linear(x, words, scale, 4096), repeat)
        rows.append(_row("linear 4096->4096", batch, times))
    return rows


@torch.no_grad()
def bitwise_share(net: nn.Module, x: torch.Tensor, repeat: int = 5) -> float:
    """Return the share of `net`'s forward time spent in its bitwise layers (the rest is full precision)."""
    spent = [0.0]
    starts = {}

    def pre(m, _):
        starts[id(m)] = time.perf_counter()

    def post(m, _, __):
        spent[0] += time.perf_counter() - starts[id(m)]

    hooks = []
    for m in net.modules():
        if isinstance(m, (BitwiseConv2d, BitwiseLinear)):
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        net(x)
        spent[0], total = 0.0, 0.0
        for _ in range(repeat):
            t = time.perf_counter()
            net(x)
            total += time.perf_counter() - t
    finally:
        for h in hooks:
            h.remove()
    return spent[0] / total


def fp32_model(path: os.PathLike | str) -> Optional[nn.Module]:
    """Return the unbinarized architecture named in a packed file's metadata (random weights), or None."""
    from safetensors import safe_open

    from ..models import from_origin

    with safe_open(str(path), framework="pt") as f:
        origin = json.loads((f.metadata() or {}).get("model") or "null")
    if not origin:
        return None
    return from_origin(origin).eval()


@torch.no_grad()
def model_rows(path: os.PathLike | str, batches: tuple[int, ...] = (1, 8), input_size: Optional[tuple[int, ...]] = None,
               repeat: int = 10, case: Optional[str] = None, model: Optional[nn.Module] = None,
               threads: tuple[int, ...] = (0,), fuse: bool = True, per_layer: bool = False) -> list[dict]:
    """Return rows timing the fp32 model against the packed file run by the bitwise runtime (and, with
    `per_layer`, each bitwise layer against the same layer of the fp32 model, on the inputs it gets there).

    The fp32 model is `model` (the unconverted architecture, needed for files made from a user
    model, as for load_packed) or else the architecture named in the file, with random weights.
    The input size is `input_size`, else the one stored in the file, else the model's own.
    Each row runs on one of `threads` (0: torch's current setting); `fuse` as in runtime.load.
    """
    fp32 = copy.deepcopy(model).eval() if model is not None else None
    net = load(path, model, fuse=fuse)
    fp32 = fp32 or fp32_model(path)
    input_size = tuple(input_size or net.irconvert_input_size or default_input_size(fp32))
    n_bit = sum(v == "bitwise" for v in net.irconvert_runtime.values())
    rows, before = [], torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t or before)
            for batch in batches:
                x = torch.randn(batch, *input_size)
                times = paired_ms(lambda: fp32(x), lambda: net(x), repeat, warmup=3)
                rows.append(_row(case or f"model {os.path.basename(str(path))}", batch, times,
                                 input_size=list(input_size), bitwise_layers=n_bit,
                                 binary_layers=len(net.irconvert_runtime), fused=fuse,
                                 fp_share=round(1 - bitwise_share(net, x), 3)))
                if per_layer:
                    rows += layer_rows_of(net, fp32, x, repeat)
    finally:
        torch.set_num_threads(before)
    return rows


def _inputs(net: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Return the input each named layer of `net` receives when `net` runs on `x`."""
    seen, hooks = {}, []
    for name in names:
        hooks.append(net.get_submodule(name).register_forward_pre_hook(
            lambda m, a, name=name: seen.setdefault(name, a[0].detach())))
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def layer_rows_of(net: nn.Module, fp32: nn.Module, x: torch.Tensor, repeat: int = 10) -> list[dict]:
    """Return one row per bitwise layer of `net`: the fp32 model's layer of that name against it, each on
    the input it receives in its own model."""
    names = [n for n, m in net.named_modules() if isinstance(m, (BitwiseConv2d, BitwiseLinear))]
    bw_in, fp_in = _inputs(net, x, names), _inputs(fp32, x, names)
    rows = []
    for name in names:
        if name not in bw_in or name not in fp_in:
            continue  # a layer this input does not reach
        bw, fp = net.get_submodule(name), fp32.get_submodule(name)
        times = paired_ms(lambda: fp(fp_in[name]), lambda: bw(bw_in[name]), repeat, warmup=2)
        rows.append(_row(f"  {name}", x.shape[0], times, layer=name))
    return rows


def markdown(rows: list[dict]) -> str:
    """Return the rows as a Markdown table."""
    lines = ["| case | batch | threads | fp32 ms | bitwise ms | speedup | speedup of minima | full-precision share |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        share = f"{r['fp_share']:.0%}" if "fp_share" in r else ""
        lines.append(f"| {r['case']} | {r['batch']} | {r['threads']} | {r['fp32_ms']:.3f} | {r['bitwise_ms']:.3f} | "
                     f"{r['speedup']:.1f}x | {r['fp32_min_ms'] / r['bitwise_min_ms']:.1f}x | {share} |")
    return "\n".join(lines)


def bench_packed(path: os.PathLike | str, batches: tuple[int, ...] = (1, 8), input_size: Optional[tuple[int, ...]] = None,
                 repeat: int = 10, json_path: Optional[os.PathLike | str] = None) -> str:
    """Return the Markdown table timing a packed file, whole model and per bitwise layer (see model_rows);
    write the rows to json_path if given."""
    from ..fileformat import packed_in
    from ..write import write_text

    rows = model_rows(packed_in(path), tuple(batches), input_size, repeat, per_layer=True)
    if json_path:
        write_text(json_path, json.dumps(rows, indent=2) + "\n")
    r = rows[0]
    return (markdown(rows) + f"\n\ninput {tuple(r['input_size'])}; {r['bitwise_layers']} of {r['binary_layers']} binary layers bitwise; "
            f"backend {r['backend']} ({r['isa'] or 'no compiled kernel'}), {r['threads']} threads; "
            "fp32 is the unconverted architecture (indented rows: one layer each, on the input it gets in "
            "its model); medians of alternating runs")


class _Timed(torch.fx.Interpreter):
    """Runs a GraphModule node by node, adding each node's milliseconds to its op kind."""

    def __init__(self, gm: torch.fx.GraphModule, spent: dict):
        super().__init__(gm)
        self.spent = spent

    def run_node(self, n: torch.fx.Node):
        t = time.perf_counter()
        out = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method"):
            kind = (type(self.module.get_submodule(n.target)).__name__ if n.op == "call_module"
                    else getattr(n.target, "__name__", str(n.target)))
            self.spent[kind] = self.spent.get(kind, 0.0) + (time.perf_counter() - t) * 1e3
        return out


@torch.no_grad()
def op_shares(net: nn.Module, x: torch.Tensor, repeat: int = 5) -> dict[str, tuple[float, float]]:
    """Return {op kind: (ms per forward, share of the forward time)} of `net` on x, timed node by node in its
    torch.fx graph (the interpreter adds a few microseconds per node)."""
    from .fuse import _Tracer

    gm = net if isinstance(net, torch.fx.GraphModule) else torch.fx.GraphModule(net, _Tracer().trace(net))
    spent: dict[str, float] = {}
    _Timed(gm, {}).run(x)
    for _ in range(repeat):
        _Timed(gm, spent).run(x)
    total = sum(spent.values())
    return {k: (round(v / repeat, 3), round(v / total, 3)) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}


def shares_markdown(columns: dict[str, dict[str, tuple[float, float]]]) -> str:
    """Return a Markdown table of op kinds (rows) by model variant (columns): ms per forward and share."""
    kinds = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| op kind | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for k in kinds:
        cells = [f"{c[k][0]:.2f} ms ({c[k][1]:.0%})" if k in c else "" for c in columns.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    totals = [f"{sum(v[0] for v in c.values()):.2f} ms" for c in columns.values()]
    lines.append("| total | " + " | ".join(totals) + " |")
    return "\n".join(lines)
