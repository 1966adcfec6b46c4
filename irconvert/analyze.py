"""Stage 2, analyze: read the model's dataflow graph with torch.fx and record, for every conv/linear,
the facts a binarization policy needs: is it the first layer (no conv/linear between it and the
input), the last (its output reaches the model output without passing another conv/linear), a
depthwise conv, and which activation modules feed it. Decisions come from the graph, not names.

timm's non-traceable modules and functions are registered with the tracer (timm keeps the list), and
every conv/linear is a leaf so subclasses with their own forward show up as one node. A conv/linear
inside another leaf module is attributed to that module's node. When tracing fails, the analysis
falls back to module order (first and last registered conv/linear, nearest preceding activation) and
says so in `Analysis.warning`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph import closure, ends, feature_layers, gates, owner_names, projections, structure_trace, weighted_layers
from .layers import can_binarize
from .ops import SUPPORTED, fan_in, is_depthwise, magnitude

# Activations whose output is never negative: sign() of it is always +1, so a binary layer fed by
# one sees no information. These are the ones the policy may replace by Hardtanh.
RELU_FAMILY = (nn.ReLU, nn.ReLU6)

# Nodes a sign can see through: they keep "never negative" true of their input.
_TRANSPARENT_MODULES = (
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.ZeroPad2d, nn.Upsample, nn.ChannelShuffle, nn.PixelShuffle,
    nn.PixelUnshuffle,
)
_TRANSPARENT_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.cat, torch.permute, torch.transpose, F.pad, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, F.interpolate,
    operator.getitem, torch.chunk, torch.split, torch.unbind, torch.stack, torch.squeeze, torch.unsqueeze,
    torch.roll, torch.narrow, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle,
}
# ShuffleNet's x.chunk(2, dim=1) halves and channel shuffle are among these
_TRANSPARENT_METHODS = {
    "flatten", "reshape", "view", "permute", "transpose", "contiguous", "mean", "float", "chunk", "split",
    "unbind", "squeeze", "unsqueeze", "expand", "repeat", "narrow", "roll", "clone", "to", "type_as",
}
_RELU_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.relu_, torch.relu_}
# Nodes that keep "never negative" when all their inputs are: products, sums and attention-style
# reweighting (SE's x * sigmoid(.), SK's (x * softmax(.)).sum(1), ECA, gating, attn @ v). A layer fed
# through them is not always one-signed (a residual add of a signed branch is not), so they only
# name the ReLUs to replace once calibration has measured the layer's input one-signed.
_COMBINING_FUNCTIONS = {
    operator.mul, operator.imul, operator.add, operator.iadd, operator.truediv, operator.matmul, torch.mul,
    torch.add, torch.div, torch.matmul, torch.bmm, torch.einsum, torch.sum, torch.mean, torch.amax, torch.max,
    F.scaled_dot_product_attention,
}
_COMBINING_METHODS = {"mul", "mul_", "add", "add_", "div", "div_", "matmul", "bmm", "sum", "expand_as", "amax", "max"}


@dataclass(frozen=True)
class LayerFacts:
    """What the graph says about one conv/linear layer."""

    name: str
    type_name: str
    kind: str  # "conv" or "linear"
    fan_in: int
    out_channels: int
    depthwise: bool
    first: bool
    last: bool
    binarizable: bool  # weight laid out one row per output channel
    feeders: tuple[str, ...] = ()  # ReLU-family modules whose output reaches this layer's input
    functional_relu: bool = False  # fed by F.relu / torch.relu, which no module swap can reach
    # its own forward runs; False when other code only reads its weight (F.linear(x, self.qkv.weight),
    # nn.MultiheadAttention's out_proj), so that its input never passes through it to be binarized
    called: bool = True
    # ReLU-family modules reaching the input through products, sums and concatenations as well
    sources: tuple[str, ...] = ()
    magnitude: int = 0  # round(log2 std(weight)): the gain that keeps the layer's output scale
    feature: bool = False  # the classifier reads its output through one-input ops only (graph.feature_layers)
    gate: bool = False  # on the gate branch of a product x * g(pool(x)), as squeeze-excitation (graph.gates)
    gated_input: bool = False  # reads such a product x * g itself, as an inverted residual's project conv (graph.gates)
    projection: bool = False  # on a residual sum's shorter side, as ResNet's 1x1 downsample (graph.projections)


@dataclass(frozen=True)
class Dataflow:
    """The fx graph reduced to what the plan's path rules read: per node (in graph order) the conv/linear
    layers it runs (itself, or those inside a leaf module) and the indices of its input nodes."""

    layers: tuple[tuple[str, ...], ...]
    inputs: tuple[tuple[int, ...], ...]

    def node(self, layer: str) -> int:
        """Index of the node that runs `layer` (ValueError if none does)."""
        return next(i for i, names in enumerate(self.layers) if layer in names)

    def bypassed(self, layer: str, barriers: set[str]) -> bool:
        """True if a path around `layer` exists: some node downstream of it is also reached from a value
        at or before its input by a path that avoids `layer` and every node running one of `barriers`
        (a residual sum, a concatenation, a product with the block's input). With `barriers` the W1A1
        layers that have no shortcut, such a path carries real values: their sum is not all signs."""
        start = self.node(layer)
        users: list[list[int]] = [[] for _ in self.layers]
        for i, ins in enumerate(self.inputs):
            for j in ins:
                users[j].append(i)
        below = closure(self.inputs[start], lambda j: self.inputs[j])
        blocked = {i for i, names in enumerate(self.layers) if i == start or any(n in barriers for n in names)}
        around = closure(below, lambda j: [u for u in users[j] if u not in blocked])
        after = closure([start], lambda j: users[j]) - {start}
        return bool(after & around)


@dataclass(frozen=True)
class Analysis:
    """Facts per conv/linear layer, in module order, and how they were found."""

    layers: dict[str, LayerFacts]
    traced: bool
    warning: str | None = None
    norm_after: dict[str, str] = field(default_factory=dict)  # conv name -> norm module right after it
    flow: Dataflow | None = None  # None when the model did not trace


def analyze(model: nn.Module, example: tuple | None = None) -> Analysis:
    """Return the per-layer facts of `model`, from its fx graph or, if tracing fails, module order. With
    `example` (the forward's arguments, or their shapes' stand-ins) the graph also sees inside timm's
    notrace modules where it can (graph.structure_trace)."""
    try:
        graph = structure_trace(model, example)
    except Exception as exc:  # any trace failure: the fallback still gives an answer
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return _analyze_module_order(
            model, f"{type(model).__name__}: torch.fx could not trace the model ({reason}); "
            "first/last layers and activations were found from module order instead"
        )
    return _analyze_graph(model, graph)


def _facts(name: str, m: nn.Module, first: bool, last: bool, feeders=(), functional=False, called=True,
           sources=(), feature: bool = False, gate: bool = False, gated_input: bool = False,
           projection: bool = False) -> LayerFacts:
    ok = can_binarize(m)
    return LayerFacts(
        name=name,
        type_name=type(m).__name__,
        kind="linear" if isinstance(m, nn.Linear) else "conv",
        fan_in=fan_in(m) if ok else 0,
        out_channels=int(m.weight.shape[0]) if ok else 0,
        depthwise=is_depthwise(m),
        first=first,
        last=last,
        binarizable=ok,
        feeders=tuple(feeders),
        functional_relu=functional,
        called=called,
        sources=tuple(sources) or tuple(feeders),
        magnitude=magnitude(m) if ok else 0,
        feature=feature,
        gate=gate,
        gated_input=gated_input,
        projection=projection,
    )


def _analyze_graph(model: nn.Module, graph: fx.Graph) -> Analysis:
    modules = dict(model.named_modules())
    weighted = weighted_layers(model)
    nodes = list(graph.nodes)

    first, last, called = ends(model, graph, weighted)
    features = feature_layers(graph, weighted, last)
    gate_branches, gated_readers = gates(model, graph, weighted)
    projecting = projections(model, graph, weighted)

    feeders: dict[str, tuple[set, bool]] = {}
    sources: dict[str, set] = {}
    norm_after: dict[str, str] = {}
    for n in nodes:
        if n.op == "call_module" and n.target in weighted and n.args:
            found, functional = _find_relus(n.args[0], modules)
            feeders[n.target] = (found, functional)
            sources[n.target] = _find_relus(n.args[0], modules, combining=True)[0] | found
            if len(n.users) == 1:
                (u,) = n.users
                if u.op == "call_module" and isinstance(modules.get(u.target), nn.modules.batchnorm._BatchNorm):
                    norm_after[n.target] = u.target

    # a layer inside a leaf module (timm's notrace attention) has no node of its own: the ReLU
    # registered just before it in that module is its candidate source, for calibration to confirm
    inner = _module_order_relus(model)
    for name in weighted:
        if name not in sources and inner.get(name) and name.startswith(inner[name].rpartition(".")[0]):
            sources[name] = {inner[name]}
    layers = {}
    for name, m in weighted.items():
        found, functional = feeders.get(name, (set(), False))
        layers[name] = _facts(name, m, name in first, name in last, sorted(found), functional, name in called,
                              sorted(sources.get(name, ())), name in features,
                              name in gate_branches, name in gated_readers, name in projecting)
    index = {n: i for i, n in enumerate(nodes)}
    flow = Dataflow(layers=tuple(tuple(owner_names(n, weighted)) for n in nodes),
                    inputs=tuple(tuple(index[a] for a in n.all_input_nodes) for n in nodes))
    return Analysis(layers=layers, traced=True, norm_after=norm_after, flow=flow)


def _find_relus(start, modules: dict[str, nn.Module], combining: bool = False) -> tuple[set[str], bool]:
    """Walk back from a layer's input through transparent nodes (and, with `combining`, products, sums
    and attention-style reweighting); return the ReLU modules met, and whether a functional relu was."""
    functions = _TRANSPARENT_FUNCTIONS | _COMBINING_FUNCTIONS if combining else _TRANSPARENT_FUNCTIONS
    methods = _TRANSPARENT_METHODS | _COMBINING_METHODS if combining else _TRANSPARENT_METHODS
    found: set[str] = set()
    functional = False
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = modules.get(n.target)
            if isinstance(m, RELU_FAMILY):
                found.add(n.target)
                continue
            act = getattr(m, "act", None)  # timm's norm+act layers (BatchNormAct2d, ...)
            if isinstance(act, RELU_FAMILY) and not isinstance(m, SUPPORTED):
                found.add(f"{n.target}.act")
                continue
            if isinstance(m, _TRANSPARENT_MODULES):
                stack.extend(n.all_input_nodes)
        elif n.op == "call_function":
            if n.target in _RELU_FUNCTIONS:
                functional = True
            elif n.target in functions:
                stack.extend(n.all_input_nodes)
        elif n.op == "call_method":
            if n.target in ("relu", "relu_"):
                functional = True
            elif n.target in methods:
                stack.extend(n.all_input_nodes)
    return found, functional


def _module_order_relus(model: nn.Module) -> dict[str, str]:
    """Return {conv/linear name: the ReLU-family module registered last before it}."""
    out, last = {}, None
    for name, m in model.named_modules():
        if isinstance(m, RELU_FAMILY):
            last = name
        elif isinstance(m, SUPPORTED) and last:
            out[name] = last
    return out


def _analyze_module_order(model: nn.Module, warning: str) -> Analysis:
    weighted = weighted_layers(model)
    names = list(weighted)
    layers = {}
    last_relu: str | None = None
    for name, m in model.named_modules():
        if isinstance(m, RELU_FAMILY):
            last_relu = name
        if name in weighted:
            feeders = (last_relu,) if last_relu else ()
            layers[name] = _facts(name, m, name == names[0], name == names[-1], feeders)
    return Analysis(layers=layers, traced=False, warning=warning)
