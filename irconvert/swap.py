"""Stage 4, swap: carry out a Plan on a model (binary layers in place, Hardtanh for ReLUs)."""

from __future__ import annotations

import copy
import warnings
from typing import Optional

from torch import nn

from .analyze import analyze
from .layers import BinaryMixin, binary_layers, make_binary, method_penalty, set_ede  # noqa: F401  (public here)
from .methods import get_method
from .plan import Plan, Policy, plan
from .shortcut import add_shortcut


def swap(model: nn.Module, the_plan: Plan) -> nn.Module:
    """Make the planned layers binary and replace the planned activations, in place; return model."""
    method = get_method(the_plan.policy.method)
    for name, lp in the_plan.layers.items():
        if lp.mode is not None:
            make_binary(model.get_submodule(name), method, lp.mode, lp.gain)
    for conv, norm in the_plan.shortcuts:
        add_shortcut(model.get_submodule(conv), model.get_submodule(norm), the_plan.policy.shortcut == "gated")
    for name in the_plan.hardtanh:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Hardtanh(-1.0, 1.0))
    model.irconvert_plan = the_plan
    return model


def binarize(model: nn.Module, policy: Optional[Policy] = None, inplace: bool = False, **policy_fields) -> nn.Module:
    """Return `model` with its conv/linear layers binarized by `policy` (IR-Net W1A1 by default).

    analyze (fx graph) -> plan (policy) -> swap. With inplace=False the caller's model is untouched.
    Keyword arguments are Policy fields, a shortcut for `policy=Policy(...)`.
    """
    if policy is None:
        policy = Policy(**policy_fields)
    elif policy_fields:
        policy = policy.model_copy(update=policy_fields)
    if any(isinstance(m, BinaryMixin) for m in model.modules()):
        raise ValueError("model is already binarized")
    if not inplace:
        model = copy.deepcopy(model)
    analysis = analyze(model)
    the_plan = plan(analysis, policy, {n: model.get_submodule(n) for n in analysis.layers})
    for w in the_plan.warnings:
        warnings.warn(w, stacklevel=2)
    return swap(model, the_plan)
