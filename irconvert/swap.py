"""Stage 4, swap: carry out a Plan on a model (binary layers in place, Hardtanh or RPReLU for ReLUs), and fuse
into the sign each Hardtanh that only W1A1 layers read (training memory; see `fuse_hardtanh`)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import warnings
from typing import Optional, Union

import torch

from torch import fx, nn

from .analyze import analyze
from .attention import prepare_attention
from .calibrate import Batch
from .calibrate import calibrate as fix_one_signed
from .errors import IRConvertError
from .fused.hardtanh import HardtanhKeepingOutput
from .graph import trace
from .layers import BinaryMixin, binary_layers, make_binary, method_penalty, set_ede  # noqa: F401  (public here)
from .methods.base import plain_input_mode
from .methods.react import RPReLU, rprelu_shapes
from .origin import infer_origin
from .plan import Plan, Policy, plan
from .shortcut import add_shortcut


def swap(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Make the planned layers binary and replace the planned activations, in place; return model."""
    prepare_attention(model)  # the plan names nn.MultiheadAttention's projections as layers
    method = the_plan.policy.binarizer()
    for name, lp in the_plan.layers.items():
        if lp.mode is not None:
            make_binary(model.get_submodule(name), method, lp.mode, lp.gain, lp.grad_scale)
    for conv, norm in the_plan.shortcuts:
        add_shortcut(model.get_submodule(conv), model.get_submodule(norm), the_plan.policy.shortcut_gated)
    like = next((p for p in model.parameters() if p.is_floating_point()), torch.empty(0))
    for name in the_plan.hardtanh:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shape = the_plan.rprelu.get(name)
        act = nn.Hardtanh(-1.0, 1.0) if shape is None else RPReLU(shape, like.dtype, like.device)
        setattr(parent, child, act)
    model.irconvert_plan = the_plan
    return model


def fuse_hardtanh(model: nn.Module, the_plan: Plan) -> Plan:
    """Fuse into the sign each Hardtanh(-1, 1) whose every output is read only as the input of W1A1 layers
    with a plain input sign: the module becomes nn.Identity, the layers' sign gets Hardtanh's gradient mask
    (sign(hardtanh x) = sign x, fused.sign's clip), and the Hardtanh's output is no longer kept for the
    backward. The other Hardtanh(-1, 1) become `HardtanhKeepingOutput` (the same numbers; the output, which
    a sign after it keeps anyway, is kept instead of the input). Return the plan with the fused ones in
    `fused`. Files still record the Hardtanh (`hardtanh`): a rebuilt model has it, which gives the same
    signs. A model fx cannot trace is left as it is."""
    try:
        graph = trace(model)
    except Exception:  # as analyze: no graph, no proof that only binary layers read the output
        return the_plan
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module" and type(modules.get(n.target)) is nn.Hardtanh:
            calls.setdefault(n.target, []).append(n)
    calls_of = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    fused = []
    for name, nodes in calls.items():
        m = modules[name]
        inside_leaf = any(name.startswith(leaf + ".") for leaf in calls_of)
        if ((m.min_val, m.max_val) != (-1.0, 1.0) or m.inplace or m._forward_hooks or m._forward_pre_hooks
                or inside_leaf):
            continue
        readers = [r for n in nodes for r in _readers(n, modules)]
        parent, _, child = name.rpartition(".")
        if not (readers and all(_reads_only_signs(u, n, modules) and calls_of[u.target] == 1 for u, n in readers)):
            setattr(model.get_submodule(parent) if parent else model, child, HardtanhKeepingOutput())
        else:
            for u, _ in readers:
                modules[u.target].binary.clip = True
            setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
            fused.append(name)
    the_plan = dataclasses.replace(the_plan, fused=tuple(sorted(fused)))
    model.irconvert_plan = the_plan
    return the_plan


def _readers(value: fx.Node, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, fx.Node]]:
    """Return (user, the value it reads) for the users of `value`, seen through nn.Identity modules (timm's
    drop_block and aa where unused)."""
    out = []
    for u in value.users:
        m = modules.get(u.target) if u.op == "call_module" else None
        if type(m) is nn.Identity and not m._forward_hooks:
            out.extend(_readers(u, modules))
        else:
            out.append((u, value))
    return out


def _reads_only_signs(user: fx.Node, value: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """True if `user` is a W1A1 layer whose input is `value`, which it only takes the plain sign of (the
    caller checks that the layer runs only there: its sign's clip applies to every call)."""
    m = modules.get(user.target) if user.op == "call_module" else None
    return (isinstance(m, BinaryMixin) and m.binary_mode == "W1A1" and not m.binary_frozen
            and not m.bireal_keep_input and not m._forward_pre_hooks and not m._forward_hooks
            and plain_input_mode(type(m.binarizer)) is not None
            and len(user.args) == 1 and user.args[0] is value and not user.kwargs)


def binarize(model: nn.Module, policy: Optional[Policy] = None, inplace: bool = False,
             calibrate: Union[Batch, bool, None] = None, **policy_fields) -> nn.Module:
    """Return `model` with its conv/linear layers binarized by `policy` (IR-Net W1A1 by default).

    analyze (fx graph) -> plan (policy) -> swap -> calibrate. With inplace=False the caller's model is
    untouched. `calibrate` is the batch (a tensor or a tuple of the forward's arguments) on which the
    W1A1 inputs are checked for one-signed bits (calibrate.py); None: random normal input at the
    model's input size; False: no check. Keyword arguments are Policy fields, a shortcut for
    `policy=Policy(...)`.
    """
    if policy is None:
        policy = Policy(**policy_fields)
    elif policy_fields:
        policy = policy.model_copy(update=policy_fields)
    if any(isinstance(m, BinaryMixin) for m in model.modules()):
        raise ValueError("model is already binarized")
    origin = infer_origin(model)  # before any change: it compares the model with a rebuilt architecture
    if not inplace:
        model = copy.deepcopy(model)
    model.irconvert_origin = origin
    seen = _seen_size(calibrate)
    if seen:  # the size the model has seen: summary's MACs and an embedded architecture use it
        model.irconvert_input_size = seen
    prepare_attention(model)
    analysis = analyze(model, _example(model, calibrate))
    the_plan = plan(analysis, policy, {n: model.get_submodule(n) for n in analysis.layers})
    if policy.activation == "rprelu" and the_plan.hardtanh:
        the_plan = _size_rprelu(model, analysis, the_plan, calibrate)
    for w in the_plan.warnings:
        warnings.warn(w, stacklevel=2)
    swap(model, the_plan)
    if calibrate is not False and any(lp.mode == "W1A1" for lp in the_plan.layers.values()):
        model.irconvert_plan, notes = _calibrate(model, analysis, calibrate)
        for w in notes:
            warnings.warn(w, stacklevel=2)
    # after calibration: it measures the Hardtanh's output, and may make a reader W1A32
    fuse_hardtanh(model, model.irconvert_plan)
    return model


def _probe_args(model: nn.Module, calibrate) -> tuple[torch.Tensor, ...]:
    """The forward's arguments of the calibration batch, or calibration's default random batch."""
    if calibrate is None or calibrate is True or calibrate is False:
        return (_default_batch(model),)
    return (calibrate,) if isinstance(calibrate, torch.Tensor) else tuple(calibrate)


def _example(model: nn.Module, calibrate) -> Optional[tuple[torch.Tensor, ...]]:
    """The forward's arguments whose shapes the structure trace uses: the calibration batch, else the
    default batch's (None where the model's input size is unknown)."""
    try:
        return _probe_args(model, calibrate)
    except Exception:  # no input size to read: analyze traces without one
        return None


def _seen_size(calibrate) -> Optional[tuple[int, ...]]:
    """Return the input size (without the batch) of a calibration batch, or None where none is given."""
    first = calibrate if isinstance(calibrate, torch.Tensor) else (
        calibrate[0] if isinstance(calibrate, (tuple, list)) and calibrate else None)
    return tuple(first.shape[1:]) if isinstance(first, torch.Tensor) and first.dim() >= 2 else None


def _default_batch(model: nn.Module) -> torch.Tensor:
    """Return 2 random normal inputs (seed 0) at the model's input size: the batch when none is given."""
    from .layer_summary import default_input_size

    return torch.randn((2,) + tuple(default_input_size(model)), generator=torch.Generator().manual_seed(0))


def _size_rprelu(model: nn.Module, analysis, the_plan: Plan, calibrate) -> Plan:
    """Return `the_plan` with the RPReLU parameter shape of each activation it replaces, measured on one forward."""
    kinds: dict[str, set] = {}
    for name, lp in the_plan.layers.items():
        for f in analysis.layers[name].feeders if lp.mode == "W1A1" else ():
            kinds.setdefault(f, set()).add(analysis.layers[name].kind)
    channels_last = {f for f, k in kinds.items() if k == {"linear"}}
    args = _probe_args(model, calibrate)
    try:
        shapes, shared = rprelu_shapes(model, the_plan.hardtanh, channels_last, args)
    except Exception as exc:  # the model wants other input: say how to give it
        raise IRConvertError(f"binarize.activation: rprelu sizes its per-channel parameters on one forward pass, "
                             f"which failed on input of shape {tuple(args[0].shape)} ({type(exc).__name__}); "
                             "pass binarize(..., calibrate=batch) with the model's input") from None
    notes = list(the_plan.warnings)
    if shared:
        notes.append(f"activation rprelu: {len(shared)} activation(s) run on inputs of different channel counts "
                     f"(a shared module) get one value for all channels: {', '.join(shared[:5])}"
                     + (" ..." if len(shared) > 5 else ""))
    return dataclasses.replace(the_plan, rprelu=shapes, warnings=tuple(notes))


def _calibrate(model: nn.Module, analysis, calibrate) -> tuple[Plan, list[str]]:
    """Run calibrate.py's check on the given batch, or on random normal input at the model's input size."""
    if calibrate is not None and calibrate is not True:
        return fix_one_signed(model, analysis, calibrate)
    batch = _default_batch(model)
    try:
        return fix_one_signed(model, analysis, batch)
    except Exception as exc:  # the model wants other input: say how to give it
        return model.irconvert_plan, [f"calibration skipped: the model does not run on random input of shape "
                                      f"{tuple(batch.shape)} ({type(exc).__name__}); pass binarize(..., calibrate=batch)"]
