"""Fused output transforms and packed chaining: the runtime's plan, built from the model's torch.fx graph.

After a W1A1 conv, IR-Net puts a BatchNorm and an activation (Hardtanh in irconvert's ResNets), and
in a residual block the sum with the shortcut; the next binary layer then only reads sign(...).
As Larq Compute Engine does, these ops become the conv's output transform, per output channel o,
on the integer accumulator dot = n_valid * C_g - 2 popcount(a xor w):

    BN(s * dot) = alpha_o * s_o * dot + beta_o,   alpha = g / sqrt(var + eps), beta = b - mean * alpha
    y           = clamp(fma(dot, alpha_o * s_o, beta_o) [+ shortcut], lo, hi)

and where every consumer of y is another W1A1 conv, sign(y) is all they read, so the conv writes
packed bits and the next conv reads them (no float tensor, no packing pass in between).

Exactness (what the fold changes, and what it does not):
- alpha and beta are read off the BatchNorm itself (beta = BN(0), alpha = BN'(1) with BN' the same
  layer with mean = bias = 0), and torch's eval BatchNorm computes x * alpha + beta as one fma on
  this CPU; the plan checks both on a probe and leaves the BatchNorm unfused if torch computes
  anything else. With s = 2^exp, s * dot is exact and so is alpha * s (unless it under- or
  overflows, which the plan checks), so fma(dot, alpha * s, beta) is the float simulation's value
  bit for bit, and so are the residual sum and the clamp, which are the same float ops.
- A float (trained) scale is the one inexact case: the simulation sums +-s terms in its conv, the
  fold rounds alpha * s once; the float outputs then differ by a few ulp (about 1e-6 relative).
- The packed output by integer threshold: with no sum in the chain, sign(y) depends on dot alone.
  The plan evaluates the simulation's own float modules (BatchNorm, Hardtanh, the consumer's
  SD-BNN threshold) at every reachable dot in [-fan_in, fan_in] and reads off, per channel,
  dot < thr (gamma > 0), dot > thr (gamma < 0) or a constant (gamma = 0); sign(0) = +1 and the
  rounding are thereby whatever the simulation does, so these bits equal its signs bit for bit.
  Only power-of-two scales qualify (with a float scale the simulation's sum is not s * dot).
- Where the chain holds a residual sum, the bits are the sign of the float y the conv also writes.
A layer that cannot be fused says why in `net.irconvert_runtime.fusion`.
"""

from __future__ import annotations

import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

from ..graph import CalledTracer
from ..layers import BinaryMixin
from ..methods.react import RPReLU
from .layers import (AffineMaxPool2d, BitwiseConv2d, BitwiseLinear, ChannelsLastMaxPool2d, FusedConv2d,
                     PackSigns)

_ADDS = (operator.add, operator.iadd, torch.add)
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


class RuntimeReport(dict):
    """name -> 'bitwise' or why the binary layer stays float; `.fusion`: name -> what is fused into that conv, or why not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fusion: dict[str, str] = {}
        self.float_fusion: dict[str, str] = {}  # float ops merged among themselves (the stem's BN + act + pool)


try:  # timm's BatchNorm + activation in one module (MobileNets, EfficientNets)
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # pragma: no cover - timm is a dependency, but the runtime does not need it
    BatchNormAct2d = None


class _Tracer(CalledTracer):
    def is_leaf_module(self, m: nn.Module, name: str) -> bool:
        # ReActNet's RPReLU stays one float module op: the chain stops at it by name (not at its `sub`)
        return (isinstance(m, (BinaryMixin, BitwiseConv2d, BitwiseLinear, RPReLU))
                or (BatchNormAct2d is not None and type(m) is BatchNormAct2d) or super().is_leaf_module(m, name))


def _split_norm_act(m: nn.Module) -> Optional[list]:
    """[('bn', BatchNorm2d), ('clamp', act)?] computing what timm's BatchNormAct2d `m` computes, or None."""
    if BatchNormAct2d is None or type(m) is not BatchNormAct2d or not _identity(m.drop):
        return None
    if not (_identity(m.act) or _clamp_of(m.act) is not None):
        return None
    bn = nn.BatchNorm2d(m.num_features, m.eps).eval()
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith(("drop.", "act."))})
    if not _foldable_bn(bn):
        return None
    return [("bn", bn)] + ([] if _identity(m.act) else [("clamp", m.act)])


@dataclass
class _Chain:
    """The float ops after a conv that fold into its output: the modules in order, the residual node, the end."""
    end: fx.Node
    modules: list = field(default_factory=list)  # (kind, module) with kind 'bn' | 'id' | 'clamp'
    residual: Optional[fx.Node] = None
    nodes: list = field(default_factory=list)
    stop: str = ""


def _module(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _clamp_of(m: nn.Module) -> Optional[tuple[float, float]]:
    if isinstance(m, nn.Hardtanh):  # ReLU6 is one
        return float(m.min_val), float(m.max_val)
    if isinstance(m, nn.ReLU):
        return 0.0, float("inf")
    return None


def _identity(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and not m.training)


def _foldable_bn(m: Optional[nn.Module]) -> bool:
    # exactly BatchNorm2d: a subclass (the Bi-Real shortcut's) adds terms of its own
    return (type(m) is nn.BatchNorm2d and not m.training and m.running_mean is not None
            and m.weight is not None and m.bias is not None)


def _chain(gm: fx.GraphModule, conv_node: fx.Node, conv: BitwiseConv2d) -> _Chain:
    """Return the ops after `conv_node` that fold into it: [BatchNorm] [+ residual] [clamp], identities anywhere."""
    ch, cur, stage = _Chain(end=conv_node), conv_node, 0  # stage: 0 conv, 1 bn, 2 sum, 3 clamp
    while True:
        if len(cur.users) != 1:
            ch.stop = f"{cur.name} has {len(cur.users)} users"
            break
        nxt = next(iter(cur.users))
        m = _module(gm, nxt)
        if m is not None and _identity(m):
            ch.modules.append(("id", m))
        elif m is not None and stage == 0 and _foldable_bn(m) and conv.bias is None:
            ch.modules.append(("bn", m))
            stage = 1
        elif m is not None and stage == 0 and conv.bias is None and _split_norm_act(m) is not None:
            parts = _split_norm_act(m)
            ch.modules += parts
            stage = 3 if len(parts) == 2 else 1
        elif (nxt.op == "call_function" and nxt.target in _ADDS and stage <= 1 and len(nxt.args) == 2
              and not nxt.kwargs and all(isinstance(a, fx.Node) for a in nxt.args) and nxt.args[0] is not nxt.args[1]):
            ch.residual = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            stage = 2
        elif m is not None and stage <= 2 and _clamp_of(m) is not None:
            ch.modules.append(("clamp", m))
            stage = 3
        else:
            ch.stop = f"{nxt.name} ({type(m).__name__ if m is not None else nxt.target}) does not fold"
            break
        ch.nodes.append(nxt)
        cur = nxt
    ch.end = cur
    return ch


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (alpha, beta) with bn(x) = fma(x, alpha, beta), read off the layer; ValueError if it computes otherwise."""
    c = bn.num_features
    with torch.no_grad():
        beta = bn(torch.zeros(1, c, 1, 2))[0, :, 0, 0].clone()
        probe = copy.deepcopy(bn)
        probe.running_mean.zero_()
        probe.bias.zero_()
        alpha = probe(torch.ones(1, c, 1, 2))[0, :, 0, 0].clone()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, c, 1, 67, generator=gen) * 4
        from .kernels import fma32

        if not torch.equal(bn(x), fma32(x, alpha.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1))):
            raise ValueError("torch's BatchNorm does not compute fma(x, alpha, beta) here")
    return alpha, beta


def thresholds(conv: BitwiseConv2d, modules: list, tau: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int32 thresholds and int8 directions with sign(chain(s * dot) - tau) = -1 iff dot <thr / >thr.

    The chain's own modules are evaluated at every dot in [-fan_in, fan_in]; ValueError where the
    negative set is not one interval at an end (a non-monotone chain).
    """
    kh, kw = conv.kernel_size
    fan = conv.in_channels // conv.groups * kh * kw
    dots = torch.arange(-fan, fan + 1, dtype=torch.float32)
    with torch.no_grad():
        v = (dots[None, :] * conv.scale[:, None]).reshape(1, -1, 1, dots.numel())
        for _, m in modules:
            v = m(v)
        if tau is not None:
            v = v - tau.reshape(1, -1, 1, 1)
        neg = ~(v[0, :, 0] >= 0)  # [O, 2 fan + 1]
    n_neg = neg.sum(1)
    o = neg.shape[0]
    idx = torch.arange(neg.shape[1])
    prefix = (neg == (idx[None, :] < n_neg[:, None])).all(1)  # -1 exactly for the smallest dots
    suffix = (neg == (idx[None, :] >= neg.shape[1] - n_neg[:, None])).all(1)
    if not bool((prefix | suffix).all()):
        raise ValueError("the sign after the chain is not a threshold on the accumulator")
    thr = torch.where(prefix, n_neg - fan, fan - n_neg)
    direction = torch.where(prefix, 1, -1)
    thr = torch.where(n_neg == 0, _INT_MIN, torch.where(n_neg == neg.shape[1], _INT_MAX, thr))
    direction = torch.where((n_neg == 0) | (n_neg == neg.shape[1]), 1, direction)
    return thr.to(torch.int32).reshape(o), direction.to(torch.int8).reshape(o)


def _pow2(s: torch.Tensor) -> bool:
    m, _ = torch.frexp(s)
    return bool((m == 0.5).all())


def _binary_input(gm: fx.GraphModule, node: fx.Node) -> Optional[BitwiseConv2d]:
    """The bitwise conv `node` calls if it can take packed bits as input (groups 1, no Bi-Real input kept)."""
    m = _module(gm, node)
    if isinstance(m, BitwiseConv2d) and m.groups == 1 and not m.bireal_keep_input:
        return m
    return None


def _affine(conv: BitwiseConv2d, ch: _Chain) -> tuple[torch.Tensor, Optional[torch.Tensor], bool, bool, list[str]]:
    """Return (alpha, beta, fma, exact, notes) of the chain's BatchNorm folded with the conv's scale."""
    bn = next((m for k, m in ch.modules if k == "bn"), None)
    if bn is None:
        return conv.scale, conv.bias, False, True, []
    alpha, beta = bn_affine(bn)
    folded = alpha * conv.scale
    exact = _pow2(conv.scale) and bool(torch.isfinite(folded).all()) and torch.equal(folded / conv.scale, alpha)
    return folded, beta, True, exact, ([] if exact else ["float scale: BN fold rounds alpha * s"])


def fuse(net: nn.Module, report: RuntimeReport) -> nn.Module:
    """Return a GraphModule of `net` with BatchNorm, residual sums and activations folded into its bitwise convs
    and packed bits passed between them; `report.fusion` says what happened to each bitwise conv."""
    try:
        graph = _Tracer().trace(net)  # as called: net(x)
    except Exception as exc:  # data-dependent control flow and the like: keep the module as it is
        why = f"not fused: the model does not trace with torch.fx ({type(exc).__name__})"
        report.fusion.update({n: why for n, v in report.items() if v == "bitwise"})
        return net
    gm = fx.GraphModule(net, graph, class_name=type(net).__name__)  # new containers: `net` is not changed
    try:
        _rewrite(gm, report)
    except Exception as exc:  # a graph shape the plan does not know: run the model unfused rather than fail
        warnings.warn(f"irconvert.runtime: fusion failed ({type(exc).__name__}: {exc}); running unfused",
                      RuntimeWarning, stacklevel=3)
        report.fusion = {n: f"not fused: planning failed ({type(exc).__name__})" for n, v in report.items()
                         if v == "bitwise"}
        report.float_fusion = {}
        return net
    for key, value in vars(net).items():  # what load_packed recorded (input size, origin, plan) goes along
        if key.startswith("irconvert_"):
            setattr(gm, key, value)
    gm.irconvert_runtime = report
    return gm.eval()  # the containers GraphModule made are new, in training mode


def _rewrite(gm: fx.GraphModule, report: RuntimeReport) -> None:
    """Fuse every bitwise conv of `gm` (in graph order, so producers before their consumers), then the pools."""
    packed: dict[fx.Node, fx.Node] = {}  # float value -> node holding its sign bits
    for node in list(gm.graph.nodes):
        m = _module(gm, node)
        if isinstance(m, BitwiseLinear):
            report.fusion[node.target] = "not fused: Linear layers run as bitwise_linear (float in, float out)"
        if node.op != "call_module" or not isinstance(m, BitwiseConv2d):
            continue
        _fuse_one(gm, node, packed, report)
    _share_packing(gm, packed, report)
    _fuse_pools(gm, report)
    _pools_channels_last(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms and activations


def _fuse_one(gm: fx.GraphModule, node: fx.Node, packed: dict, report: RuntimeReport) -> None:
    """Replace conv `node` and the ops after it by one FusedConv2d node (and a getitem where it returns two)."""
    conv = _module(gm, node)
    name = node.target
    x = node.args[0]
    packed_in = isinstance(x, fx.Node) and bool(x.meta.get("irconvert_bits"))
    if conv.bireal_keep_input or len(node.args) != 1 or node.kwargs:
        report.fusion[name] = "not fused: the Bi-Real shortcut reads its float input" if conv.bireal_keep_input \
            else "not fused: called with extra arguments"
        return
    ch = _chain(gm, node, conv)
    users = list(ch.end.users)
    binary_users = [u for u in users if _binary_input(gm, u) is not None and u.args and u.args[0] is ch.end]
    taus = [_module(gm, u).threshold for u in binary_users]
    try:
        alpha, beta, fma, exact, notes = _affine(conv, ch)
    except ValueError as exc:
        ch = _Chain(end=node, stop=str(exc))
        users = list(node.users)
        binary_users, taus = [], []
        alpha, beta, fma, exact, notes = conv.scale, conv.bias, False, True, [str(exc)]
    clamp = next((_clamp_of(m) for k, m in ch.modules if k == "clamp"), None)
    thr = direction = None
    all_binary = bool(binary_users) and len(binary_users) == len(users)
    same_tau = all_binary and all(torch.equal(t, taus[0]) if t is not None and taus[0] is not None
                                  else t is taus[0] for t in taus)
    if same_tau and ch.residual is None and exact and conv.bias is None and _pow2(conv.scale):
        try:
            thr, direction = thresholds(conv, ch.modules, taus[0])
        except ValueError as exc:
            notes.append(str(exc))
    if thr is None:  # bits from the float output, for consumers that binarize it as it is
        binary_users = [u for u, t in zip(binary_users, taus) if t is None]
    want_bits = bool(binary_users)
    want_float = thr is None
    fused = FusedConv2d(conv, alpha, beta, fma, clamp, want_float, want_bits, thr, direction, packed_in)
    _set(gm, name, fused)
    with gm.graph.inserting_before(ch.end):
        args = (x,) if ch.residual is None else (x, ch.residual)
        new = gm.graph.call_module(name, args)
    out_f = out_b = new
    new.meta["irconvert_bits"] = not want_float and want_bits
    if want_float and want_bits:
        with gm.graph.inserting_after(new):
            out_f = gm.graph.call_function(operator.getitem, (new, 0))
        with gm.graph.inserting_after(out_f):
            out_b = gm.graph.call_function(operator.getitem, (new, 1))
        out_b.meta["irconvert_bits"] = True
    for u in binary_users:
        u.replace_input_with(ch.end, out_b)
    if want_float:
        ch.end.replace_all_uses_with(out_f)
        if want_bits:
            packed[out_f] = out_b
    for n in reversed([node] + ch.nodes):
        gm.graph.erase_node(n)
    report.fusion[name] = _describe(ch, fused, binary_users, notes)


def _set(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)


def _describe(ch: _Chain, fused: FusedConv2d, binary_users: list, notes: list[str]) -> str:
    ops = [type(m).__name__ for k, m in ch.modules if k != "id"]
    if ch.residual is not None:
        ops.insert(1 if ops and ops[0] == "BatchNorm2d" else 0, f"+ {_value_name(ch.residual)}")
    out = ("bits (integer thresholds)" if fused.thr is not None
           else "float + bits" if fused.want_bits else "float")
    text = f"fused: {' '.join(ops) if ops else 'nothing'} -> {out}; input {'bits' if fused.packed_input else 'float'}"
    if ch.stop and not fused.want_bits:
        text += f"; chain stops: {ch.stop}"
    return text + "".join(f"; {n}" for n in notes)


def _value_name(node: fx.Node) -> str:
    """The module a value comes from (through a fused conv's getitem), for the report."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return str(node.target) if node.op == "call_module" else node.name


def _share_packing(gm: fx.GraphModule, packed: dict, report: RuntimeReport) -> None:
    """Pack a float value once where two or more bitwise convs read it, and pass them the bits."""
    for node in list(gm.graph.nodes):
        if node.meta.get("irconvert_bits") or node in packed or node.op == "output":
            continue
        readers = [u for u in node.users if _reads_float(gm, u, node)]
        if len(readers) < 2:
            continue
        name = f"{node.name}_signs"
        gm.add_submodule(name, PackSigns())
        with gm.graph.inserting_after(node):
            bits = gm.graph.call_module(name, (node,))
        bits.meta["irconvert_bits"] = True
        for u in readers:
            u.replace_input_with(node, bits)
            m = _module(gm, u)
            m.packed_input = True
            report.fusion[u.target] = report.fusion[u.target].replace("input float", f"input bits ({name})")


def _reads_float(gm: fx.GraphModule, user: fx.Node, node: fx.Node) -> bool:
    m = _module(gm, user)
    return (isinstance(m, FusedConv2d) and not m.packed_input and m.groups == 1 and m.threshold is None
            and not m.bireal_keep_input and user.args[0] is node)


def _pools_channels_last(gm: fx.GraphModule) -> None:
    """Run each max-pool in channels-last memory (see ChannelsLastMaxPool2d): exact, and far faster here."""
    for node in gm.graph.nodes:
        m = _module(gm, node)
        if type(m) is nn.MaxPool2d and not m.return_indices:
            _set(gm, node.target, ChannelsLastMaxPool2d(m))


def _pool_chain(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[list, list, fx.Node]]:
    """If BatchNorm `node` is followed (one user each) by identities, at most one clamp and a MaxPool2d:
    (modules, nodes after the BatchNorm, the pool node)."""
    m = _module(gm, node)
    modules = [("bn", m)] if _foldable_bn(m) else _split_norm_act(m)
    if not modules:
        return None
    nodes, cur = [], node
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        m = _module(gm, nxt)
        if type(m) is nn.MaxPool2d and not m.return_indices and not m.ceil_mode and m.dilation in (1, (1, 1)):
            return modules, nodes, nxt
        if m is None or not (_identity(m) or (_clamp_of(m) is not None and all(k != "clamp" for k, _ in modules))):
            return None
        if not _identity(m):
            modules.append(("clamp", m))
        nodes.append(nxt)
        cur = nxt
    return None


def _fuse_pools(gm: fx.GraphModule, report: RuntimeReport) -> None:
    """Merge BatchNorm -> Hardtanh/ReLU -> MaxPool2d chains of float values into one AffineMaxPool2d pass."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1:
            continue
        found = _pool_chain(gm, node)
        if found is None:
            continue
        modules, nodes, pool_node = found
        try:
            alpha, beta = bn_affine(modules[0][1])
        except ValueError as exc:
            report.float_fusion[pool_node.target] = f"not fused: {exc}"
            continue
        clamp = next((_clamp_of(m) for k, m in modules if k == "clamp"), None)
        _set(gm, pool_node.target, AffineMaxPool2d(alpha, beta, clamp, _module(gm, pool_node)))
        with gm.graph.inserting_before(pool_node):
            new = gm.graph.call_module(pool_node.target, node.args)
        pool_node.replace_all_uses_with(new)
        for n in reversed([node] + nodes + [pool_node]):
            gm.graph.erase_node(n)
        names = [str(n.target) for n in [node] + nodes if n.op == "call_module"]
        report.float_fusion[pool_node.target] = f"fused: {' + '.join(names)} + {pool_node.target} in one pass"
