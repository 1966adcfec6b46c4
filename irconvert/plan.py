"""Stage 3, plan: the binarization policy, and the per-layer decisions it gives on an Analysis.

`Policy` is one small immutable object (it is also the `binarize:` section of a recipe).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch

from .analyze import Analysis, LayerFacts
from .errors import IRConvertError
from .methods import Binarizer, get_method, method_spec
from .methods.react import with_rsign

Decision = Literal["keep", "binary", "W1A1", "W1A32"]


class Policy(BaseModel):
    """Which conv/linear layers become binary, and how.

    Each layer's decision is taken from the most specific rule that speaks about it, in this order
    of precedence (lowest first; a later level overrides an earlier one):

      1. global:     every binarizable conv/linear gets `mode` (W1A1 or W1A32) with `method`.
      2. type:       `types` maps a class name (the layer's class or any base class, e.g.
                     "Linear", "StdConv2d") to a decision.
      3. structure:  `keep_first`, `keep_last`, `keep_depthwise`, `keep_gates`, `keep_projections` and
                     `min_fan_in` keep layers full precision by what the graph says (first = no conv/linear
                     between it and the input; last = its output reaches the model output without another
                     one; gate = on the branch g of a product x * g(pool(x)), squeeze-excitation's convs;
                     projection = on a residual sum's shorter side, ResNet's 1x1 downsample:
                     graph.projections);
                     `features` makes the classifier's feature layer W1A32 (see below), and
                     `gated_input` each layer that reads a gated product x * g (see below);
                     `w1a1_min_fan_in` makes a W1A1 layer with a smaller fan-in W1A32 (see below).
      4. pattern:    `patterns` maps a glob ("blocks.*.attn.qkv") or a regex prefixed "re:" to a
                     decision, matched against the full module name; when several match, the one
                     written last wins.
      5. exact name: `layers` maps a full module name to a decision.

    A decision is "keep" (full precision), "binary" (binary in the global `mode`), "W1A1" or
    "W1A32". Layers whose weight is not one row per output channel (CondConv2d's expert bank) are
    always kept; a W1A1 layer whose weight other code reads directly (F.linear(x, self.qkv.weight),
    nn.MultiheadAttention's out_proj) becomes W1A32, since its input never passes through it.
    `hardtanh` replaces the ReLU/ReLU6 modules whose output reaches a W1A1 layer by Hardtanh(-1, 1)
    (default: on for W1A1, off for W1A32), because sign(ReLU(x)) is always +1. What the graph
    alone cannot tell (a ReLU behind a product or a softmax-weighted sum, a sigmoid gate, a pooled
    input) `binarize` measures on a calibration batch after the swap and fixes (calibrate.py).
    `features` is what the classifier's feature layer becomes (a conv/linear whose output the last layer
    reads through normalization, activation, pooling, flatten or dropout only, as EfficientNet's and
    MobileNet's conv_head; graph.feature_layers): "W1A32" by default (binary weights, real input) under
    a W1A1 policy, "keep" (full precision), or "binary" (the global mode). W1A1 there makes every
    feature a step function of the layer below, and every flip moves the logits by whole weights of the
    classifier: with a freshly drawn classifier (timm's EfficientNet-family init, U(+-1/sqrt(classes)))
    such a model does not learn (the zoo's "learns" check). A residual sum in front of the classifier
    (ResNet, ViT, ConvNeXt) has no feature layer. Structure level, so patterns and names override it.
    `gated_input` is what a layer reading a gate's product x * g becomes (an inverted residual's project conv
    after squeeze-excitation; graph.gates): "W1A32" by default, "keep" or "binary". A W1A1 layer there sees
    sign(x * g) = sign(x) for a positive gate, so the gate does nothing for it: measured in bench.zoo_real
    (docs/policy.md, Gates). Structure level, like `features`.
    `w1a1_min_fan_in` makes a W1A1 layer whose fan-in (inputs per output, C_in * k * k / groups) is under
    it W1A32: binary weights, real input. A W1A1 output is an integer in [-fan_in, fan_in], so a narrow
    layer (ShuffleNetV2-0.5's 24-channel 1x1 convs) passes on a coarse count of agreeing signs; its
    weights stay 1 bit. 64 by default, measured in bench.zoo_real on the 27 fast-list models it changes
    (docs/policy.md, Narrow layers); 0 turns it off. Structure level: patterns and names override it.
    `keep_magnitude` gives each binary layer the fixed gain 2^round(log2 std(w)) of its weight at
    conversion (see `layers`), so that it keeps the output scale of the layer it replaces; off
    gives the paper's equations exactly (the same under a BatchNorm).
    `shortcut` says where a Bi-Real shortcut y = BN(conv(sign x)) + S(x) goes (shortcut.py; S fits every
    shape of 2-D conv) among the W1A1 convs followed by a BatchNorm: "auto" (the default) around those
    the graph shows no real-valued path around (no residual sum spanning them; `auto_shortcuts`), true
    around every one, false nowhere; "gated" (every one) and "auto-gated" multiply each shortcut by a
    learned per-channel factor that starts at 0, so a converted pretrained model starts unchanged.
    `shortcut_width` (on by default) makes "auto" also put one on every W1A1 conv that changes the channel
    count (an inverted residual's expand and project convs, a ResNet stage's first conv), whether or not a
    residual sum spans it: measured in bench.zoo_real, +0.6 to +2.3 points on MobileNetV2, MobileNetV3-Large
    and both ResNet-18s, where a shortcut on every conv (`true`) cost a ResNet-18 1.7.
    `rsign` puts ReActNet's RSign on the input of every W1A1 layer, B_a = sign(a - alpha) with a
    learned per-channel threshold alpha starting at 0, in front of any method without an input
    shift of its own (methods/react.py). `activation` is what replaces those ReLUs: "hardtanh", or
    "rprelu", ReActNet's RPReLU with learned per-channel gamma, beta, zeta (sized on one forward
    pass at conversion; a ReLU reached only through sums or products, which calibration replaces,
    gets Hardtanh either way).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["W1A1", "W1A32"] = "W1A1"
    method: str = "irnet"
    keep_first: bool = True
    keep_last: bool = True
    keep_depthwise: bool = True
    keep_gates: bool = True
    keep_projections: bool = True
    features: Literal["W1A32", "keep", "binary"] = "W1A32"
    gated_input: Literal["W1A32", "keep", "binary"] = "W1A32"
    min_fan_in: int = Field(0, ge=0)
    w1a1_min_fan_in: int = Field(64, ge=0)
    types: dict[str, Decision] = Field(default_factory=dict)
    patterns: dict[str, Decision] = Field(default_factory=dict)
    layers: dict[str, Decision] = Field(default_factory=dict)
    hardtanh: Optional[bool] = None
    keep_magnitude: bool = True
    shortcut: Union[bool, Literal["auto", "gated", "auto-gated"]] = "auto"
    shortcut_width: bool = True
    rsign: bool = False
    activation: Literal["hardtanh", "rprelu"] = "hardtanh"

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, v) -> str:
        """A registered name, 'module:Class', or a Binarizer instance; stored as the string that names it."""
        try:
            method = get_method(v)
        except IRConvertError as exc:
            raise ValueError(str(exc).removeprefix("binarize.method: ")) from None
        spec = method_spec(method)
        if get_method(spec) != method:
            raise ValueError(f"{method!r} differs from {spec} built with no arguments, which a file records; "
                             "make a subclass that sets what differs, and register it")
        return spec

    @model_validator(mode="after")
    def _rsign_fits(self):
        if self.activation == "rprelu" and self.hardtanh is False:
            raise ValueError("activation rprelu replaces the ReLUs that hardtanh: false keeps; "
                             "leave hardtanh unset, or set activation: hardtanh")
        if self.rsign:
            with_rsign(type(get_method(self.method)))  # ValueError naming the method if it has its own shift
        return self

    @field_validator("patterns")
    @classmethod
    def _valid_patterns(cls, v: dict) -> dict:
        for p in v:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"pattern {p!r} is not a valid regex ({e})") from None
        return v

    @property
    def shortcut_gated(self) -> bool:
        """Whether each Bi-Real shortcut is times a learned gate (shortcut.py's gated form)."""
        return self.shortcut in ("gated", "auto-gated")

    def binarizer(self) -> Binarizer:
        """Return the method instance the binary layers use: `method`, with RSign in front of it if `rsign`."""
        method = get_method(self.method)
        return with_rsign(type(method))() if self.rsign else method

    @property
    def replace_relu(self) -> bool:
        """Whether ReLU-family modules feeding W1A1 layers become Hardtanh."""
        return self.mode == "W1A1" if self.hardtanh is None else self.hardtanh


@dataclass(frozen=True)
class LayerPlan:
    """One layer's decision: mode is None for a layer kept full precision; reason says which rule."""

    name: str
    mode: Optional[str]
    reason: str
    gain: int = 0  # the binary weight is 2^gain * s * B
    grad_scale: float = 1.0  # W1A1: dL/da = grad_scale * EDE'(a) * dL/dB, 1 / std(a) at calibration


@dataclass(frozen=True)
class Plan:
    """Decisions for every conv/linear, the activations to replace, and warnings to show the user."""

    policy: Policy
    layers: dict[str, LayerPlan]
    hardtanh: tuple[str, ...]
    warnings: tuple[str, ...]
    shortcuts: tuple[tuple[str, str], ...] = ()  # (binary conv, the BatchNorm after it)
    shortcut_reasons: dict[str, str] = field(default_factory=dict)  # W1A1 conv -> why it has a shortcut or none
    live: dict[str, float] = field(default_factory=dict)  # W1A1 layer -> share of +1 input bits (calibrate.py)
    fused: tuple[str, ...] = ()  # Hardtanh modules of `hardtanh` fused into their W1A1 readers' sign (training only)
    # activation (of `hardtanh`) -> the shape of its RPReLU parameters (Policy.activation "rprelu"); others: Hardtanh
    rprelu: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def binary(self) -> list[str]:
        """Names of the layers that become binary."""
        return [n for n, p in self.layers.items() if p.mode is not None]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _resolve(decision: str, policy: Policy) -> Optional[str]:
    if decision == "keep":
        return None
    return policy.mode if decision == "binary" else decision


def decide(facts: LayerFacts, policy: Policy, mro_names: tuple[str, ...]) -> LayerPlan:
    """Return the decision for one layer by the precedence written in `Policy`'s docstring."""
    if not facts.binarizable:
        return LayerPlan(facts.name, None, "weight is not one row per output channel")
    mode, reason = policy.mode, "global"
    for t in mro_names:
        if t in policy.types:
            mode, reason = _resolve(policy.types[t], policy), f"type {t}"
            break
    structural = [
        (policy.keep_first and facts.first, "first layer"),
        (policy.keep_last and facts.last, "last layer"),
        (policy.keep_depthwise and facts.depthwise, "depthwise"),
        (policy.keep_gates and facts.gate, "gate (squeeze-excitation)"),
        (policy.keep_projections and facts.projection, "projection shortcut (the shorter side of a residual sum)"),
        (facts.fan_in < policy.min_fan_in, f"fan-in {facts.fan_in} < min_fan_in {policy.min_fan_in}"),
    ]
    for hit, why in structural:
        if hit:
            mode, reason = None, why
            break
    else:
        if facts.feature and policy.features != "binary":
            mode = None if policy.features == "keep" else ("W1A32" if mode is not None else None)
            reason = f"feature layer of the classifier ({policy.features})"
        elif facts.gated_input and policy.gated_input != "binary":
            mode = None if policy.gated_input == "keep" else ("W1A32" if mode is not None else None)
            reason = f"reads a gated product x * g, whose sign is sign(x) ({policy.gated_input})"
    if mode == "W1A1" and facts.fan_in < policy.w1a1_min_fan_in:
        mode, reason = "W1A32", f"{reason}; W1A32 as its fan-in {facts.fan_in} < w1a1_min_fan_in {policy.w1a1_min_fan_in}"
    for pat, dec in policy.patterns.items():
        if _matches(pat, facts.name):
            mode, reason = _resolve(dec, policy), f"pattern {pat}"
    if facts.name in policy.layers:
        mode, reason = _resolve(policy.layers[facts.name], policy), "name"
    if mode == "W1A1" and not facts.called:
        mode, reason = "W1A32", f"{reason}; W1A32 as its weight is used outside its forward, which never sees its input"
    gain = facts.magnitude if mode is not None and policy.keep_magnitude else 0
    return LayerPlan(facts.name, mode, reason, gain)


def plan(analysis: Analysis, policy: Policy, modules: dict[str, "torch.nn.Module"]) -> Plan:
    """Return the Plan of `policy` over `analysis`; `modules` maps layer names to the layers."""
    unknown = [n for n in policy.layers if n not in analysis.layers]
    warnings = [analysis.warning] if analysis.warning else []
    if unknown:
        warnings.append(f"binarize.layers names no conv/linear layer: {', '.join(unknown)}")
    layers = {}
    for name, facts in analysis.layers.items():
        mro = tuple(c.__name__ for c in type(modules[name]).__mro__)
        layers[name] = decide(facts, policy, mro)

    hardtanh: set[str] = set()
    functional = []
    if policy.replace_relu:
        for name, lp in layers.items():
            if lp.mode != "W1A1":
                continue
            hardtanh.update(analysis.layers[name].feeders)
            if analysis.layers[name].functional_relu:
                # sign() would see only +1: a constant output, whose zero variance under a
                # BatchNorm sends the gradient to NaN (torchvision's Inception, GoogLeNet)
                functional.append(name)
                layers[name] = LayerPlan(name, "W1A32", f"{lp.reason}; W1A32 as it is fed by a functional relu",
                                         lp.gain)
    if functional:
        warnings.append(
            f"{len(functional)} layer(s) are fed by a functional relu (F.relu/torch.relu) that no module swap "
            f"can reach, so a binary input would always be +1; they are W1A32: {', '.join(functional[:5])}"
            + (" ..." if len(functional) > 5 else "")
            + "; keep them full precision with binarize.patterns if you prefer"
        )
    shortcuts, reasons = auto_shortcuts(analysis, policy, layers, modules)
    note = _shortcut_note(policy, reasons)
    if note:
        warnings.append(note)
    return Plan(policy=policy, layers=layers, hardtanh=tuple(sorted(hardtanh)), warnings=tuple(warnings),
                shortcuts=shortcuts, shortcut_reasons=reasons)


def method_label(policy: Policy, plan: Optional["Plan"] = None) -> str:
    """Return the binarization as trained, in words: 'irnet + RSign + RPReLU + Bi-Real shortcut (gated)'.
    The auto forms name the shortcut only where `plan` placed one (on a ResNet "auto" adds none)."""
    parts = [policy.method]
    if policy.rsign:
        parts.append("RSign")
    if policy.activation == "rprelu":
        parts.append("RPReLU")
    auto = isinstance(policy.shortcut, str) and policy.shortcut.startswith("auto")
    if policy.shortcut and (not auto or (plan is not None and plan.shortcuts)):
        form = {"gated": " (gated)", "auto": " (auto)", "auto-gated": " (auto, gated)"}.get(policy.shortcut, "")
        parts.append("Bi-Real shortcut" + form)
    return " + ".join(parts)


def plan_counts(p: Plan) -> str:
    """Return the plan in one line: '16 layers W1A1, 6 kept full precision (first layer 1, pattern *.downsample.0 4, ...)'."""
    modes: dict[str, int] = {}
    kept: dict[str, int] = {}
    for lp in p.layers.values():
        if lp.mode is None:
            why = lp.reason.split(";")[0]
            kept[why] = kept.get(why, 0) + 1
        else:
            modes[lp.mode] = modes.get(lp.mode, 0) + 1
    binary = ", ".join(f"{n} layer{'s' if n != 1 else ''} {m}" for m, n in sorted(modes.items())) or "no binary layer"
    total = sum(kept.values())
    why = ", ".join(f"{w} {n}" for w, n in kept.items())
    return f"{binary}, {total} kept full precision" + (f" ({why})" if why else "")


SHORTCUT_ADDED = "shortcut: no real-valued path around it"
SHORTCUT_WIDTH = "shortcut: it changes the channel count (shortcut_width)"
SHORTCUT_EVERY = "shortcut: every W1A1 conv (shortcut: true)"
SHORTCUT_AROUND = "none: a real-valued path goes around it (a residual sum)"
SHORTCUT_NO_NORM = "none: no BatchNorm right after it, or not a 2-D conv"
SHORTCUT_NO_GRAPH = "none: the model did not trace, so auto cannot see a path around it"


def auto_shortcuts(analysis: Analysis, policy: Policy, layers: dict[str, LayerPlan],
                   modules: dict[str, "torch.nn.Module"]) -> tuple[tuple[tuple[str, str], ...], dict[str, str]]:
    """Return the (conv, BatchNorm) pairs that get a Bi-Real shortcut, and each W1A1 conv's reason.

    The candidates are the W1A1 convs with a BatchNorm right after them. `shortcut: true` or "gated"
    takes every candidate. "auto" takes those with no real-valued path around them: no node after the
    conv is also reached from a value at or before its input along a path that avoids the conv and
    every W1A1 layer without a shortcut (`Dataflow.bypassed`). The candidates are visited in reverse
    graph order and each shortcut placed counts as a real-valued path for the ones visited after it,
    so a block whose every branch is binary (ResNet's downsample block with a binary 1x1 downsample)
    gets one shortcut, on its last conv (the downsample), which then spans the block's other convs.
    A model that does not trace has no graph to read paths from: "auto" adds no shortcut there.
    """
    if policy.shortcut is False:
        return (), {}
    from .shortcut import fits

    w1a1 = [n for n, lp in layers.items() if lp.mode == "W1A1" and analysis.layers[n].kind == "conv"]
    reasons = {n: SHORTCUT_NO_NORM for n in w1a1 if n not in analysis.norm_after or not fits(modules[n])}
    candidates = [n for n in w1a1 if n not in reasons]
    if policy.shortcut in (True, "gated"):
        reasons.update({n: SHORTCUT_EVERY for n in candidates})
    elif analysis.flow is None:
        reasons.update({n: SHORTCUT_NO_GRAPH for n in candidates})
    else:
        barriers = {n for n, lp in layers.items() if lp.mode == "W1A1"}
        flow = analysis.flow
        if policy.shortcut_width:
            for n in candidates:
                if modules[n].in_channels != modules[n].out_channels:
                    reasons[n] = SHORTCUT_WIDTH
                    barriers.discard(n)
        for n in sorted((c for c in candidates if c not in reasons), key=flow.node, reverse=True):
            if flow.bypassed(n, barriers):
                reasons[n] = SHORTCUT_AROUND
            else:
                reasons[n] = SHORTCUT_ADDED
                barriers.discard(n)
    pairs = tuple((n, analysis.norm_after[n]) for n in candidates if reasons[n].startswith("shortcut"))
    return pairs, {n: reasons[n] for n in w1a1}


def _shortcut_note(policy: Policy, reasons: dict[str, str]) -> str:
    """The line that says where the shortcuts went (counts by reason); empty where there is nothing to say."""
    n = {r: sum(v == r for v in reasons.values()) for r in (SHORTCUT_ADDED, SHORTCUT_WIDTH, SHORTCUT_AROUND, SHORTCUT_NO_NORM)}
    n[SHORTCUT_ADDED] += n[SHORTCUT_WIDTH]
    if policy.shortcut in (True, "gated"):
        return (f"shortcut: {n[SHORTCUT_NO_NORM]} of {len(reasons)} W1A1 convs got no Bi-Real shortcut (no BatchNorm "
                "right after them, or not a 2-D conv)") if n[SHORTCUT_NO_NORM] else ""
    if not n[SHORTCUT_ADDED]:
        return ""  # "auto" on a ResNet: every block has its residual sum, and nothing changes
    return (f"shortcut {policy.shortcut}: a Bi-Real shortcut on {n[SHORTCUT_ADDED]} of {len(reasons)} W1A1 convs, "
            f"those with no real-valued path around them; {n[SHORTCUT_AROUND]} have one (a residual sum)"
            + (f"; {n[SHORTCUT_NO_NORM]} have no BatchNorm right after them" if n[SHORTCUT_NO_NORM] else ""))
