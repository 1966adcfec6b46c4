"""One model of the zoo sweep (`python -m bench.zoo` runs this in its worker processes): create it (random init,
10 classes), binarize it with the default policy, and check that it

    has live binary inputs   every W1A1 layer's input bits have both signs (calibrate.py), at least
                             LIVE of the minority sign on the sweep's batch;
    keeps a sane gradient    the gradient norm on a batch is at most MAX_GRAD_RATIO times the FP
                             model's on the same batch and loss;
    learns                   AdamW_STEPS AdamW steps (lr 1e-3) on one fixed batch lower the loss by at
                             least MIN_LOSS_DROP: the mean loss of the last LAST_STEPS steps against
                             the loss before the first;
    reloads exactly          packed.safetensors, rebuilt from the file alone (no model=), gives the
                             trained model's eval outputs within TOLERANCE.

The loss is cross-entropy on fixed random labels for every (batch, 10) output (the classifier and
auxiliary heads) and the mean square of any other output. Every stage trains with the model's stochastic
regularizers (dropout, drop-path, stochastic depth, DropBlock modules) switched off and its
normalization in training mode (`train_deterministic`): with them on, the loss before and after the
steps are two draws of a random variable (torchvision's EfficientNet drops its head's features with
p = 0.2 and whole residual branches with p up to 0.2), and a drop of 10% would say as much about the draw as
about the optimizer.

The loss after the steps is the mean over the last LAST_STEPS of them, not the last one alone. A deep W1A1
network at random init is a chaotic map of its parameters: a step that moves a few latent weights or a
BatchNorm scale flips a few signs in an early layer, and the flips spread through every later one. Its
loss on a fixed batch then jumps by whole units from one step to the next (timm's MobileNetV3-Large:
2.3, 1.2, 3.1, 3.3, 1.1, ...), and the same run on 1 or 2 threads, whose sums round differently, agrees for
a few steps and then parts. The last loss alone decided such a model's verdict by where the jumps
happened to stop; the mean of the last five is what the steps reached. `loss_curve` keeps every step's loss.

A model that does not learn is tried once more, rebuilt from the same seed with its classifier drawn
from N(0, 0.01) (torchvision's init for its heads) before the conversion: `loss_drop_small_head`. It
does not change the verdict; it tells a random classifier's gain (timm's EfficientNet-family init draws
a 10-class head from U(+-1/sqrt(10)), 30x torchvision's, and every flip of a binary feature then moves
the loss by whole units) from a conversion that cannot learn. A user converts a trained head.

Such a model is also measured for chaos (`sensitivity`): the mean relative change of the loss when every
parameter moves by +-SENSITIVITY_STEP (random signs, SENSITIVITY_DRAWS draws), for the converted model and
the FP one. An AdamW step moves every parameter by about its learning rate, so a model whose loss moves
by several percent under steps 100x smaller than the check's cannot show a trend in 20 steps. It does not
change the verdict either: it names the reason (from CHAOTIC on). Converted ResNets and ConvNeXts measure
0.5-2%, their FP twins under 0.01%; the failing MobileNet-like chains of W1A1 layers with no real-valued
path around them 5-40% (docs/benchmarks.md, Model zoo).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path

STAGES = ("create", "binarize", "gradient", "learn", "export", "reload", "compare")
TOLERANCE = 1e-5
SMALL = 64
BATCH = 4  # a BatchNorm over 2 samples of a 1x1 map divides by their difference: binary outputs make it ~0
CLASSES = 10
MAX_GRAD_RATIO = 100.0
ADAMW_STEPS = 20
MIN_LOSS_DROP = 0.10
LAST_STEPS = 5
LIVE = 1e-3  # the same bound as irconvert.calibrate.LIVE
SENSITIVITY_STEP = 1e-5
SENSITIVITY_DRAWS = 3
CHAOTIC = 0.05  # a sensitivity from here on is named as the reason a model does not learn


def _tensors(out) -> list:
    """Flatten a model output (tensor, tuple, list, dict, namedtuple) into its tensors."""
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def input_size(model) -> tuple[int, ...]:
    """Return (C, H, W): the smallest of 64, 96, ..., 224 below its own input size on which the
    unconverted model runs in training mode (auxiliary heads and all), else its own input size."""
    import torch

    cfg = getattr(model, "pretrained_cfg", None) or {}
    native = tuple(cfg.get("input_size", (3, 224, 224)))
    c = native[0]
    tried = []
    # the small sizes first; models with a patch grid or a fixed pooling need a multiple of it
    sides = [SMALL, 96, 112, 128, 160, 192, 224]
    for size in [(c, h, h) for h in sides if h < native[1]] + [native, (c, 224, 224), (c, 299, 299)]:
        if size in tried:
            continue
        tried.append(size)
        try:
            with torch.no_grad():
                model.train()(torch.randn(BATCH, *size))
            return size
        except Exception:
            continue
    raise RuntimeError(f"the unconverted model runs on none of the input sizes {tried}")


def loss_of(out, labels):
    """Cross-entropy on `labels` for each (batch, classes) output, mean square for the others."""
    import torch.nn.functional as F

    floats = [t for t in _tensors(out) if t.is_floating_point() and t.requires_grad]
    if not floats:
        raise RuntimeError("the model output holds no tensor that depends on the parameters")
    return sum(F.cross_entropy(t.float(), labels) if tuple(t.shape) == (len(labels), CLASSES) else t.float().pow(2).mean()
               for t in floats)


def stochastic_types() -> tuple[type, ...]:
    """The module classes that make a training forward random: dropout, drop-path, stochastic depth, DropBlock."""
    from torch import nn

    kinds: list[type] = [nn.modules.dropout._DropoutNd]
    try:
        from timm.layers import DropBlock2d, DropPath
        kinds += [DropPath, DropBlock2d]
    except ImportError:
        pass
    try:
        from torchvision.ops import StochasticDepth
        kinds.append(StochasticDepth)
    except ImportError:
        pass
    return tuple(kinds)


def train_deterministic(net) -> None:
    """Put `net` in training mode with its stochastic regularizer modules in eval mode (identity), so that the
    loss of a fixed batch is a function of the parameters alone. (A dropout written as F.dropout inside a
    forward stays on: timm's drop_rate, torchvision's DenseNet and Swin; their defaults make its p 0.)"""
    net.train()
    kinds = stochastic_types()
    for m in net.modules():
        if isinstance(m, kinds):
            m.eval()


def grad_norm(net, x, labels) -> float:
    """Return the gradient norm (float64, so that a huge one shows as a number) of one training batch."""
    import torch

    train_deterministic(net)
    net.zero_grad(set_to_none=True)
    loss = loss_of(net(x), labels)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {float(loss)}")
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    norm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    net.zero_grad(set_to_none=True)
    return norm


def finite_loss(net, x, labels, step: int):
    """Return the loss of `net` on the batch; RuntimeError naming `step` if it is not finite."""
    import torch

    loss = loss_of(net(x), labels)
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss became {float(loss)} at step {step}")
    return loss


def adamw_steps(net, batches) -> list[float]:
    """One AdamW step (lr 1e-3) per (input, labels) of `batches`; return the loss before each step."""
    import torch

    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step, (x, labels) in enumerate(batches):
        loss = finite_loss(net, x, labels, step)
        losses.append(float(loss))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return losses


def loss_curve(net, x, labels, steps: int = ADAMW_STEPS) -> list[float]:
    """Run `steps` AdamW steps (lr 1e-3) on the batch; return the loss before each step and after the last."""
    train_deterministic(net)
    losses = adamw_steps(net, [(x, labels)] * steps)
    return losses + [float(finite_loss(net, x, labels, steps))]


def _record(name: str, source: str) -> dict:
    return {"model": name, "source": source, "status": "fail", "stage": "create", "reason": "",
            "binary_layers": None, "kept_layers": None, "w1a32_layers": None, "hardtanh": None,
            "binary_mac_share": None, "size_ratio": None, "input_size": None, "traced": None,
            "live_min": None, "grad_norm": None, "grad_norm_fp": None, "grad_ratio": None,
            "loss_first": None, "loss_last": None, "loss_drop": None, "loss_curve": None, "bypassed": None,
            "max_abs_diff": None, "loss_drop_small_head": None, "sensitivity": None, "sensitivity_fp": None,
            "seconds": None}


def _binarize(model, x, rec: dict):
    """Binarize with calibration on the sweep's own batch; record the plan's figures."""
    import irconvert

    net = irconvert.binarize(model, inplace=True, calibrate=x)  # a copy would double the peak memory
    the_plan = net.irconvert_plan
    rec["binary_layers"] = len(the_plan.binary)
    rec["kept_layers"] = len(the_plan.layers) - len(the_plan.binary)
    rec["w1a32_layers"] = sum(p.mode == "W1A32" for p in the_plan.layers.values())
    rec["hardtanh"] = len(the_plan.hardtanh)
    rec["traced"] = not any("could not trace" in w for w in the_plan.warnings)
    rec["binary_mac_share"] = round(irconvert.summary(net, tuple(x.shape[1:])).binary_mac_share, 4)
    shares = [min(s, 1 - s) for s in the_plan.live.values()]
    rec["live_min"] = round(min(shares), 5) if shares else None
    return net


def _gradient(net, x, labels, rec: dict) -> None:
    """Record the binary model's gradient norm and its ratio to the FP model's; check every binary layer is called."""
    import irconvert

    called: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: called.add(n))
             for n, m in irconvert.binary_layers(net)]
    try:
        rec["grad_norm"] = grad_norm(net, x, labels)
    finally:
        for h in hooks:
            h.remove()
    rec["bypassed"] = sorted(set(dict(irconvert.binary_layers(net))) - called)
    if not math.isfinite(rec["grad_norm"]):
        raise RuntimeError(f"gradient norm is {rec['grad_norm']} (float32 overflow in the backward)")
    rec["grad_ratio"] = rec["grad_norm"] / max(rec["grad_norm_fp"], 1e-30)


def criteria_failure(rec: dict) -> str | None:
    """Return why a record that passed every stage still fails the 'learns' criterion, or None."""
    if rec["live_min"] is not None and rec["live_min"] < LIVE:
        return f"a W1A1 input is one-signed ({100 * rec['live_min']:.2f}% of its bits of the minority sign)"
    if rec["grad_ratio"] is not None and rec["grad_ratio"] > MAX_GRAD_RATIO:
        return f"gradient norm {rec['grad_ratio']:.3g}x the FP model's (> {MAX_GRAD_RATIO:g})"
    if rec["loss_drop"] is not None and rec["loss_drop"] < MIN_LOSS_DROP:
        small = rec.get("loss_drop_small_head")
        also = f"; with the classifier from N(0, 0.01): {100 * small:.1f}%" if small is not None else ""
        chaos = rec.get("sensitivity")
        if chaos is not None and chaos >= CHAOTIC:
            step = f"{SENSITIVITY_STEP:g}".replace("e-0", "e-")
            also += (f"; chaotic: a ±{step} step on every parameter moves the loss by "
                     f"{100 * chaos:.1f}% (FP: {100 * rec['sensitivity_fp']:.2g}%)")
        return (f"{ADAMW_STEPS} AdamW steps lowered the loss (mean of the last {LAST_STEPS}) by "
                f"{100 * rec['loss_drop']:.1f}% "
                f"(< {100 * MIN_LOSS_DROP:g}%){also}")
    return None


def sweep_model(spec: str, **kwargs):
    """Return model `spec` as the sweep builds it: seed 0, CLASSES classes, no recorded origin (the packed file
    must name the architecture as for a model built by timm or torchvision itself); kwargs go to its constructor."""
    import torch

    from irconvert.models import create_model

    torch.manual_seed(0)
    model = create_model(spec, num_classes=CLASSES, **kwargs)
    del model.irconvert_origin
    return model


def sweep_batch(size: tuple[int, ...]):
    """Return the sweep's batch of input size `size`: (BATCH random normal images, fixed random labels)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randn((BATCH, *size), generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def small_head(model) -> bool:
    """Draw `model`'s classifier from N(0, 0.01), bias 0 (torchvision's init for its heads); return False if it
    has no single Linear (or 1x1 conv, as DLA's) classifier."""
    import torch

    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None and hasattr(model, "classifier"):  # torchvision: Sequential(..., Linear)
        head = model.classifier[-1] if isinstance(model.classifier, torch.nn.Sequential) else model.classifier
    if not (isinstance(head, torch.nn.Linear) or isinstance(head, torch.nn.Conv2d) and head.kernel_size == (1, 1)):
        return False
    with torch.no_grad():
        head.weight.normal_(0, 0.01)
        if head.bias is not None:
            head.bias.zero_()
    return True


def small_head_drop(spec: str, x, labels) -> float | None:
    """Return the loss drop of the same model and batch with its classifier drawn from N(0, 0.01), or None
    if it has no single Linear or 1x1-conv classifier."""
    import irconvert

    model = sweep_model(spec)
    if not small_head(model):
        return None
    return relative_drop(loss_curve(irconvert.binarize(model, inplace=True, calibrate=x), x, labels))


def sensitivity(net, x, labels, step: float = SENSITIVITY_STEP, draws: int = SENSITIVITY_DRAWS) -> float:
    """Return the mean relative loss change when every trainable parameter of `net` moves by +-`step`
    (random signs; `draws` draws, seeded); the parameters are restored. The net is put in
    `train_deterministic` mode."""
    import torch

    train_deterministic(net)
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    first = float(loss_of(net(x), labels))  # loss_of wants outputs that need grad: no no_grad here
    with torch.no_grad():
        saved = [p.clone() for p in params]
    changes = []
    for _ in range(draws):
        moves = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype) * step for p in params]
        with torch.no_grad():
            for p, m in zip(params, moves):
                p.add_(m)
        changes.append(abs(float(loss_of(net(x), labels)) - first) / max(first, 1e-12))
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    return round(sum(changes) / len(changes), 5)


def sensitivities(spec: str, x, labels) -> tuple[float, float]:
    """Return (converted, FP) `sensitivity` of model `spec` as the sweep builds it, before any step."""
    import irconvert

    model = sweep_model(spec)
    fp = sensitivity(model, x, labels)
    return sensitivity(irconvert.binarize(model, inplace=True, calibrate=x), x, labels), fp


def reached(losses: list[float]) -> float:
    """Return the loss the steps reached: the mean of the last LAST_STEPS losses of the curve."""
    tail = losses[-LAST_STEPS:]
    return sum(tail) / len(tail)


def label_prior_loss(size) -> float:
    """Return the entropy of the sweep batch's labels at input size `size`: the cross-entropy of predicting
    the label frequencies for every image (1.04 for labels like [2, 3, 1, 2], ln 4 for four different ones)."""
    return _label_entropy(tuple(size))


@functools.lru_cache(maxsize=None)
def _label_entropy(size: tuple[int, ...]) -> float:
    import torch

    _, labels = sweep_batch(size)
    p = torch.bincount(labels, minlength=CLASSES).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def at_label_prior(rec: dict, within: float = 0.03) -> bool:
    """True if a model's steps stopped at the label prior: the loss they reached is within `within` of
    label_prior_loss and the last 10 losses are flat. From ln 10 (equal logits) that is a drop of 55% for
    labels like [2, 3, 1, 2], which passes the check while the features do not yet tell the images apart."""
    curve = rec.get("loss_curve")
    if not curve or rec.get("loss_last") is None or not rec.get("input_size"):
        return False
    prior = label_prior_loss(rec["input_size"])
    tail = curve[-10:]
    return abs(rec["loss_last"] - prior) < within * prior and max(tail) - min(tail) < 0.05


def relative_drop(losses: list[float]) -> float:
    """Return 1 - reached / first loss, rounded (0 for a loss that starts at 0)."""
    first = losses[0]
    return round(1 - reached(losses) / first, 4) if first > 0 else 0.0


def check_model(spec: str, report=lambda stage: None) -> dict:
    """Run every stage on model `spec` ('name' or 'torchvision:name'); return the result record."""
    import warnings

    import torch

    import irconvert
    from irconvert.models import split_name
    from irconvert.verify import max_abs_diff

    source, name = split_name(spec)
    rec = _record(name, source)
    t0 = time.perf_counter()
    stage = "create"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report(stage)
            model = sweep_model(spec)
            size = input_size(model)
            rec["input_size"] = list(size)
            x, labels = sweep_batch(size)
            rec["grad_norm_fp"] = grad_norm(model, x, labels)

            stage = "binarize"
            report(stage)
            net = _binarize(model, x, rec)
            del model

            stage = "gradient"
            report(stage)
            _gradient(net, x, labels, rec)

            stage = "learn"
            report(stage)
            curve = loss_curve(net, x, labels)
            rec["loss_curve"] = [round(v, 4) for v in curve]
            rec["loss_first"], rec["loss_last"] = curve[0], reached(curve)
            rec["loss_drop"] = relative_drop(curve)
            if rec["loss_drop"] < MIN_LOSS_DROP:
                rec["loss_drop_small_head"] = small_head_drop(spec, x, labels)
                rec["sensitivity"], rec["sensitivity_fp"] = sensitivities(spec, x, labels)
            net.eval()

            stage = "export"
            report(stage)
            with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
                packed = irconvert.save_packed(net, Path(tmp) / "packed.safetensors")
                latent = irconvert.save_latent(net, Path(tmp) / "model.safetensors")
                rec["size_ratio"] = round(packed.stat().st_size / latent.stat().st_size, 4)

                stage = "reload"
                report(stage)
                loaded = irconvert.load_packed(packed)

            stage = "compare"
            report(stage)
            diff = max_abs_diff(net, loaded, torch.randn(1, *size))
            rec["max_abs_diff"] = diff
            if not diff <= TOLERANCE:
                raise RuntimeError(f"reloaded model differs from the trained one by {diff:.3g} > {TOLERANCE:g}")
        why = criteria_failure(rec)
        rec.update(status="ok" if why is None else "fail", stage="" if why is None else "criteria", reason=why or "")
    except Exception as exc:
        text = " ".join(str(exc).split()) or ""
        rec.update(stage=stage, reason=f"{type(exc).__name__}: {text}"[:300])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


if __name__ == "__main__":
    import json
    import sys

    for spec in sys.argv[1:]:
        print(json.dumps(check_model(spec)), flush=True)
