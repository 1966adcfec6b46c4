"""The model's dataflow graph, shared by load (models.py: the stem to adapt, the head to resize)
and analyze (the facts per layer): torch.fx with timm's leaf modules and functions registered, every
conv/linear one leaf node, and the layers at the graph's two ends.

    first(L) = no conv/linear upstream of L        last(L) = a conv/linear-free path from L to the output
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from typing import Optional

import torch
from torch import fx, nn
from torch.fx.experimental.meta_tracer import MetaProxy, MetaTracer

from .ops import SUPPORTED


class CalledTracer(fx.Tracer):
    """fx tracer of a model as it is called, `model(x)`: the forward's arguments that have a default are
    fixed at it (`defaults`) unless `concrete_args` says otherwise."""

    def trace(self, root, concrete_args=None):
        if concrete_args is None and isinstance(root, nn.Module):
            concrete_args = defaults(root)
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a Bi-Real shortcut's BatchNorm (shortcut.add_shortcut gives it `bireal_conv`) reads its conv's kept
        # input, which a traced conv never stores: one node. Read by attribute: graph sits below the layers.
        return "bireal_conv" in vars(m) or super().is_leaf_module(m, qualname)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's registered leaf modules and leaf functions (none without timm: it is optional for user models)."""
    try:
        from timm.layers import _fx as timm_fx
    except ImportError:
        return (), ()
    return tuple(timm_fx.get_notrace_modules()), tuple(timm_fx.get_notrace_functions())


class _Tracer(CalledTracer):
    """fx tracer with timm's leaf modules/functions registered and every conv/linear a leaf."""

    def __init__(self):
        self._timm_leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SUPPORTED) or (self._timm_leaves and isinstance(m, self._timm_leaves)):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """Return the fx graph of `model` run as it is called, `model(x)` (raises whatever fx raises when it
    cannot trace): the forward's arguments that have a default are fixed at it."""
    return _Tracer().trace(model)


def opaque_leaves(model: nn.Module, graph: fx.Graph) -> list[str]:
    """The call_module nodes' targets in `graph` that run conv/linear layers inside them without being
    one: timm's notrace modules (MobileViT's blocks, EfficientViT's attention, NF-Net's blocks), which
    hide from the structure rules the sums, gates and norms around their layers."""
    modules = dict(model.named_modules())
    return [n.target for n in graph.nodes if n.op == "call_module" and not isinstance(modules[n.target], SUPPORTED)
            and _holds_layer(modules[n.target])]


def _holds_layer(m: nn.Module) -> bool:
    """True if `m` or a module inside it is a conv/linear layer."""
    return any(isinstance(c, SUPPORTED) for c in m.modules())


class _DeviceProxy(MetaProxy):
    """A meta tracer's value whose device is the concrete meta device, not a traced attribute: a forward that
    branches on `x.device.type` (EfficientViT's autocast guard) takes a branch, and tensors it makes on
    that device are meta tensors like the rest."""

    @property
    def device(self) -> torch.device:
        return torch.device("meta")


class _OpenTracer(MetaTracer):
    """fx tracer over meta tensors that opens timm's notrace modules: their forwards branch on shapes
    (`if H % patch:`), which meta tensors make concrete. Every conv/linear is still one leaf node, and so
    is each timm leaf without one inside (BatchNormAct2d: the BatchNorm after a conv)."""

    def __init__(self):
        self._closed, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)

    def proxy(self, node: fx.Node) -> MetaProxy:
        return _DeviceProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, SUPPORTED) or "bireal_conv" in vars(m):
            return True
        if self._closed and isinstance(m, self._closed):
            return not _holds_layer(m)
        return super().is_leaf_module(m, qualname)


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors: no data is copied."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def structure_trace(model: nn.Module, example: Optional[tuple] = None) -> fx.Graph:
    """Return the graph the structure rules read: `trace(model)`, or, where that graph has opaque leaves
    (`opaque_leaves`) and an example input is given, the graph traced through them on meta tensors of
    the example's shapes (the first forward argument; the others at their defaults). Falls back to
    `trace(model)` where the opened trace fails; raises what `trace` raises."""
    graph = trace(model)
    first = example[0] if example else None
    if not isinstance(first, torch.Tensor) or not opaque_leaves(model, graph):
        return graph
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        concrete = {k: v for k, v in defaults(model).items() if k != params[0].name}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the meta tracer warns where it cannot size a value
            return _OpenTracer().trace(_on_meta(model), meta_args={params[0].name: first.to("meta")},
                                       concrete_args=concrete)
    except Exception:  # any failure of the opened trace: the closed graph still holds
        return graph


def defaults(model: nn.Module) -> dict[str, object]:
    """The forward's arguments with a default value, at that value. fx makes every argument it is not
    given a proxy, and a proxy is never None: timm's Hiera, `if mask is None: x = self.forward_head(x)`,
    traced without its head, so its classifier was not the last layer and became binary."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward with no signature to read (a C extension)
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Return {name: module} of every conv/linear of `model`, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SUPPORTED)}


def ends(model: nn.Module, graph: fx.Graph, weighted: dict[str, nn.Module]) -> tuple[set, set, set]:
    """Return (first, last, called): the conv/linear layers with none upstream, those with a
    conv/linear-free path to the output, and those whose own forward the graph runs."""
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    owners = {n: owner_names(n, weighted) for n in nodes}
    is_w = {n: bool(owners[n]) for n in nodes}
    upstream = {}
    for n in nodes:
        upstream[n] = any(upstream[a] or is_w[a] for a in n.all_input_nodes)
    free_to_out = {}
    for n in reversed(nodes):
        free_to_out[n] = n.op == "output" or any((not is_w[u]) and free_to_out[u] for u in n.users)
    first, last, called = set(), set(), set()
    for n in nodes:
        names = owners[n]
        if not names:
            continue
        # a torch.nn leaf (MultiheadAttention, TransformerEncoderLayer) may read its children's
        # weights directly; timm's leaves and plain modules call their children
        if n.target in weighted or not type(modules[n.target]).__module__.startswith("torch.nn"):
            called.update(names)
        if not upstream[n]:
            first.add(names[0])
        if any(u.op == "output" or ((not is_w[u]) and free_to_out[u]) for u in n.users):
            last.add(names[-1])
    return first, last, called


def feature_layers(graph: fx.Graph, weighted: dict[str, nn.Module], last: set[str]) -> set[str]:
    """Return the classifier's feature layers: the conv/linear layers whose output a last layer reads through
    nodes of one input each (normalization, activation, pooling, flatten, dropout), as EfficientNet's and
    MobileNet's conv_head or torchvision MobileNetV3's first classifier Linear; not through a sum with a
    shortcut (ResNet, ViT, ConvNeXt), where the classifier reads more than that layer."""
    out = set()
    for n in graph.nodes:
        if n.op != "call_module" or n.target not in last or len(n.all_input_nodes) != 1:
            continue
        (cur,) = n.all_input_nodes
        while not owner_names(cur, weighted) and cur.op != "placeholder" and len(cur.all_input_nodes) == 1:
            (cur,) = cur.all_input_nodes
        names = owner_names(cur, weighted)
        if names and names[-1] not in last:
            out.add(names[-1])
    return out


# Nodes that reduce a feature map to a summary (global pooling): a gate branch starts with one.
# (functions and methods by name, modules by class name)
_REDUCING = {"mean", "sum", "amax", "adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool1d",
             "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "SelectAdaptivePool2d",
             "AdaptiveAvgMaxPool2d", "AdaptiveCatAvgMaxPool2d"}
_PRODUCTS = {"mul", "mul_", "imul"}
_PASS_THROUGH = {"Identity", "Dropout", "Dropout2d", "DropPath", "dropout", "contiguous"}


def closure(start, step) -> set:
    """The nodes reached from `start` (included) by repeating `step`."""
    seen, stack = set(start), list(start)
    while stack:
        for j in step(stack.pop()):
            if j not in seen:
                seen.add(j)
                stack.append(j)
    return seen


def _ancestors(n: fx.Node) -> set:
    """The nodes `n`'s value depends on (itself not included)."""
    return closure(n.all_input_nodes, lambda a: a.all_input_nodes)


def _callee(n: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The name of what a node calls: a function's or method's name, a module's class name."""
    if n.op == "call_module":
        return type(modules.get(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else str(n.target)


def gates(model: nn.Module, graph: fx.Graph, weighted: dict[str, nn.Module]) -> tuple[set[str], set[str]]:
    """Return (gate layers, gated readers) of the products x * g where x also feeds g through a global pooling
    (squeeze-excitation, ECA, CBAM, split attention). Gate layers: the conv/linear layers that g's value
    depends on and x's does not; such a layer sees a pooled summary and scales whole channels of x, so its
    output is what a model multiplies its features by, not a feature map. Gated readers: the conv/linear
    layers that read the product itself (through identity or dropout only), as an inverted residual's
    project conv reads x * SE(x); the sign of their input is sign(x) wherever g > 0, so a W1A1 reader
    cannot see the gate at all."""
    modules = dict(model.named_modules())
    layers: set[str] = set()
    readers: set[str] = set()
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method") or _callee(n, modules) not in _PRODUCTS:
            continue
        ins = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        for x, g in (ins, ins[::-1]) if len(ins) == 2 else ():
            above = _ancestors(g)
            if x not in above:
                continue
            branch = above - _ancestors(x) - {x} | {g}
            if any(_callee(b, modules) in _REDUCING for b in branch):
                layers.update(name for b in branch for name in owner_names(b, weighted))
                readers.update(_readers(n, modules, weighted))
    return layers, readers


_SUMS = {"add", "add_", "iadd"}


def projections(model: nn.Module, graph: fx.Graph, weighted: dict[str, nn.Module]) -> set[str]:
    """Return the conv/linear layers on a residual sum's shorter side. A sum a + b + ... (a chain of adds read
    as one) whose terms start from a common value: the layers that only one term depends on are that term's;
    a term with at least one, but fewer than the term with the most, is the block's path around its main
    branch, as ResNet's 1x1 downsample (a projection shortcut) or GhostNet's depthwise + 1x1 shortcut. An
    identity shortcut has no layer; the equal branches of RepVGG and MobileOne are no shorter side."""
    modules = dict(model.named_modules())
    is_sum = lambda n: isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and \
        _callee(n, modules) in _SUMS and sum(isinstance(a, fx.Node) for a in n.args[:2]) == 2
    # a sum whose one user is another sum is part of that one's chain, read from the chain's last add
    chained = lambda n: is_sum(n) and len(n.users) == 1 and is_sum(next(iter(n.users)))

    def terms(n: fx.Node) -> list[fx.Node]:
        return [t for a in n.args[:2] for t in (terms(a) if chained(a) else [a])]

    out: set[str] = set()
    for n in graph.nodes:
        if not is_sum(n) or chained(n):
            continue
        up = [_ancestors(t) | {t} for t in terms(n)]
        if not set.intersection(*up):
            continue
        own = [{name for b in mine - set().union(*(o for j, o in enumerate(up) if j != i))
                for name in owner_names(b, weighted)} for i, mine in enumerate(up)]
        most = max(map(len, own))
        out.update(name for layers in own if 0 < len(layers) < most for name in layers)
    return out


def _readers(node: fx.Node, modules: dict[str, nn.Module], weighted: dict[str, nn.Module]) -> set[str]:
    """The conv/linear layers that read `node`'s value through pass-through ops only (identity, dropout)."""
    out: set[str] = set()
    for u in node.users:
        if u.op == "call_module" and u.target in weighted:
            out.add(u.target)
        elif _callee(u, modules) in _PASS_THROUGH and len(u.all_input_nodes) == 1:
            out |= _readers(u, modules, weighted)
    return out


def owner_names(node: fx.Node, weighted: dict[str, nn.Module]) -> list[str]:
    """The conv/linear layers a call_module node runs (itself, or those inside a leaf)."""
    if node.op != "call_module":
        return []
    if node.target in weighted:
        return [node.target]
    prefix = node.target + "."
    return [n for n in weighted if n.startswith(prefix)]


def last_layers(model: nn.Module) -> tuple[str, ...]:
    """Return the names of the classifier layers (last by graph; the last registered one if fx cannot trace)."""
    weighted = weighted_layers(model)
    try:
        graph = trace(model)
    except Exception:  # the same fallback as analyze's: module order
        return tuple(list(weighted)[-1:])
    _, last, _ = ends(model, graph, weighted)
    return tuple(n for n in weighted if n in last)
