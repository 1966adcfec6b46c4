"""Stage 5, train: one fine-tuning loop for both stages (the FP teacher, then the binary student).

The binary stage distills from the teacher (KL at temperature T, weighted with the label loss, and
optionally attention transfer between matching stages, `distill.py`) and moves EDE's t from t_min
to t_max over its steps. Optimizer and LR schedule come from timm's factories; the latent weights of
binary layers may get their own weight decay and a learning rate scaled to their spread
(`latent_lr`), and gradients may be clipped by global norm or adaptively (AGC, timm's). Ten log
points per epoch record the training loss and, for the binary stage, the sign-flip rate (`flips.py`).
A two-stage schedule (`w1a32_epochs`) trains the W1A1 layers with real activations first. After the
last epoch BatchNorm statistics may be re-estimated on training batches (`reestimate_bn`), before the
final evaluation. Every epoch starts from a seed derived from (seed, stage, epoch), so a run resumed
from an epoch's checkpoint continues exactly as one that was never stopped.
"""

from __future__ import annotations

import difflib
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .distill import FeatureTap, attention_loss, default_layers
from .distributed import sum_all
from .flips import FlipMeter
from .methods.ede import ede_t
from .errors import IRConvertError
from .recipe import DistillSection, EDESection, Schedule
from .layers import binary_layers, method_penalty, set_ede


class Diverged(IRConvertError):
    """The loss became NaN or infinite."""


@dataclass
class Stage:
    """What one call of `fit` trains: the model, its schedule, and for the binary stage KD and EDE."""

    name: str
    model: nn.Module
    schedule: Schedule
    seed: int
    teacher: Optional[nn.Module] = None
    distill: Optional[DistillSection] = None
    ede: Optional[EDESection] = None
    amp: str = "off"
    compile: "str | bool" = False  # the recipe's train.compile: True, False or "auto" (on for CUDA)
    history: list[dict] = field(default_factory=list)


def logits_of(out) -> torch.Tensor:
    """Return the logits of a model output (the first element of tuple outputs such as GoogLeNet's)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return T^2 * KL(softmax(teacher/T) || softmax(student/T)), Hinton et al.'s distillation loss."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    reduction="batchmean", log_target=True) * (t * t)


def latent_spread(layer: nn.Module) -> float:
    """Return the mean per-output-channel standard deviation of a binary layer's latent weight."""
    w = layer.latent_weight.detach().float().flatten(1)
    return float(w.std(1, unbiased=False).mean()) if w.shape[1] > 1 else float(w.std(unbiased=False))


def param_groups(model: nn.Module, weight_decay: float, latent_weight_decay: Optional[float], lr: float,
                 latent_lr: str = "same") -> list[dict]:
    """Return optimizer groups: `latent_weight_decay` (None: `weight_decay`) on binary layers' latent
    weights, none on biases and 1-d tensors (norms, scales; timm's rule), `weight_decay` on the other
    weights. latent_lr 'std': one group per binary layer, its lr scaled by `latent_spread` over the median;
    a number u: one group per binary layer, its lr u * `latent_spread`."""
    layers = [m for _, m in binary_layers(model) if m._parameters.get("weight") is not None]
    latent = {id(m._parameters["weight"]) for m in layers}
    groups: dict[str, list] = {"decay": [], "none": [], "latent": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "latent" if id(p) in latent else "none" if p.ndim <= 1 or name.endswith(".bias") else "decay"
            groups[key].append(p)
    lwd = weight_decay if latent_weight_decay is None else latent_weight_decay
    decay = {"decay": weight_decay, "none": 0.0, "latent": lwd}
    out = [{"params": ps, "weight_decay": decay[k]} for k, ps in groups.items() if ps and k != "latent"]
    trained = [m for m in layers if m._parameters["weight"].requires_grad]
    if latent_lr != "same" and trained:
        spread = {id(m): latent_spread(m) for m in trained}
        scale = lr / max(statistics.median(spread.values()), 1e-12) if latent_lr == "std" else float(latent_lr)
        out += [{"params": [m._parameters["weight"]], "weight_decay": lwd, "lr": scale * spread[id(m)]} for m in trained]
    elif groups["latent"]:
        out.append({"params": groups["latent"], "weight_decay": lwd})
    return out


def make_optimizer(model: nn.Module, s: Schedule, steps_per_epoch: int, where: str = "train"):
    """Return (optimizer, scheduler or None) from timm's factories; the scheduler steps per update."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    kw = {"momentum": s.momentum} if s.optimizer.lower() in ("sgd", "momentum", "nesterov") else {}
    latent_lr = getattr(s, "latent_lr", "same")
    grouped = s.latent_weight_decay is not None or latent_lr != "same"
    params = param_groups(model, s.weight_decay, s.latent_weight_decay, s.lr, latent_lr) if grouped else model
    try:
        opt = create_optimizer_v2(params, opt=s.optimizer, lr=s.lr, weight_decay=s.weight_decay, **kw)
    except (ValueError, AssertionError, TypeError, ImportError) as exc:
        from timm.optim import list_optimizers

        if s.optimizer.lower() in list_optimizers():
            raise IRConvertError(f"{where}.optimizer: timm cannot build {s.optimizer!r} here "
                                 f"({str(exc).splitlines()[0][:100]}); choose another optimizer") from None
        close = difflib.get_close_matches(s.optimizer.lower(), list_optimizers(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.optim.list_optimizers()"
        raise IRConvertError(f"{where}.optimizer: {s.optimizer!r} is not a timm optimizer "
                             f"({str(exc).splitlines()[0][:100]}){hint}") from None
    if s.scheduler == "none":
        return opt, None
    # timm's poly schedule with power 1 is a linear decay from lr to min_lr
    sched, _ = create_scheduler_v2(opt, sched="poly" if s.scheduler == "linear" else s.scheduler,
                                   num_epochs=s.epochs, warmup_epochs=s.warmup_epochs, decay_rate=1.0,
                                   min_lr=s.min_lr, warmup_lr=s.lr * 0.01, step_on_epochs=False,
                                   updates_per_epoch=steps_per_epoch)
    return opt, sched


def check_schedule(s: Schedule, where: str) -> None:
    """Raise IRConvertError if timm cannot build the schedule's optimizer (found before any file is written)."""
    make_optimizer(nn.Linear(1, 1), s, 1, where)


@torch.no_grad()
def reestimate_bn(model: nn.Module, loader, batches: int, device: torch.device) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average over `batches` batches
    of `loader` (train-mode forward, no gradient); return the batches used. The running averages kept
    during binary training mix statistics of weights that have since flipped sign."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: cumulative average over the batches seen since the reset
    was_training = model.training
    model.train()
    n = 0
    for x, _ in loader:
        if n >= batches:
            break
        model(x.to(device))
        n += 1
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    model.train(was_training)
    return n


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "off") -> dict:
    """Return top-1, top-5 accuracy (percent) and mean loss of `model` over `loader`, summed over processes."""
    model.eval()
    n = correct1 = correct5 = 0
    loss = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device, amp):
            out = logits_of(model(x)).float()
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=1).sum())
        n += len(y)
    n, correct1, correct5, loss = sum_all([n, correct1, correct5, loss])
    return {"top1": 100.0 * correct1 / max(n, 1), "top5": 100.0 * correct5 / max(n, 1), "loss": loss / max(n, 1)}


def _autocast(device: torch.device, amp: str):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def epoch_seed(seed: int, stage: str, epoch: int) -> int:
    """Return the seed every epoch starts from (the same in a resumed run)."""
    return seed * 1_000_003 + (0 if stage == "teacher" else 500_000) + epoch


def _restore(opt, sched, resume: Optional[dict]) -> None:
    """Load the optimizer's and the schedule's state from a checkpoint (nothing without one)."""
    if resume:
        opt.load_state_dict(resume["optimizer"])
        if sched is not None and resume.get("scheduler"):
            sched.load_state_dict(resume["scheduler"])


def _seed_epoch(stage: Stage, train_loader, epoch: int) -> None:
    """Seed dropout, augmentation and the shuffle of `epoch` from the epoch alone, so a resumed run repeats it."""
    torch.manual_seed(epoch_seed(stage.seed, stage.name, epoch))
    train_loader.generator.manual_seed(epoch_seed(stage.seed, stage.name, epoch))
    if hasattr(train_loader.sampler, "set_epoch"):
        train_loader.sampler.set_epoch(epoch)


def _loss(stage: Stage, net: nn.Module, x: torch.Tensor, y: torch.Tensor, distill: bool,
          penalized: bool, taps=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (logits, loss): cross-entropy, blended with KD from the teacher (and attention transfer
    when `taps` holds the student's and the teacher's FeatureTap), plus the method's own term."""
    out = logits_of(net(x))
    loss = F.cross_entropy(out, y, label_smoothing=stage.schedule.label_smoothing)
    if distill:
        with torch.no_grad():
            t_out = logits_of(stage.teacher(x))
        a = stage.distill.alpha
        loss = a * kd_loss(out.float(), t_out.float(), stage.distill.temperature) + (1 - a) * loss
        if taps is not None:
            loss = loss + stage.distill.attention * attention_loss(taps[0].out, taps[1].out)
    if penalized and (extra := method_penalty(stage.model)) is not None:
        loss = loss + extra  # the binarization method's own term (e.g. L2 on trained scales)
    return out, loss


def _step(model: nn.Module, loss: torch.Tensor, opt, scaler, grad_clip: Optional[float], clip_mode: str = "norm") -> None:
    """Backward, clip (timm's dispatch_clip_grad: global norm, AGC or value) and one optimizer step
    (through the fp16 gradient scaler when there is one)."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    if grad_clip:
        from timm.utils import dispatch_clip_grad

        dispatch_clip_grad([p for p in model.parameters() if p.grad is not None], grad_clip, mode=clip_mode)
    scaler.step(opt) if scaler is not None else opt.step()
    if scaler is not None:
        scaler.update()


def _progress(bar, lines: bool, what: str, i: int, steps: int, loss: float, acc: float, **more) -> None:
    """Advance the progress bar; without one (`lines`: output to a log), print a line per tenth of the epoch."""
    bar.update()
    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.1f}", **more)
    if lines and (i + 1) % max(1, steps // 10) == 0:
        print(f"{what} step {i + 1}/{steps}: loss {loss:.4f}  acc {acc:.1f}%", file=sys.stderr, flush=True)


def training_net(model: nn.Module, compile: "str | bool", device: torch.device) -> nn.Module:
    """Return what the steps call: `model`, under DDP when processes share the work, compiled when
    train.compile says so (auto: on CUDA); the state, EDE's t and the schedule stay on `model`."""
    net = DistributedDataParallel(model) if dist.is_initialized() else model
    if compile is True or (compile == "auto" and device.type == "cuda"):
        net = torch.compile(net)  # the binary layers' sign is a custom op: one graph, no break
    return net


def _attention_taps(stage: Stage):
    """Return (student tap, teacher tap) for attention transfer (train.distill.attention > 0), else None."""
    if stage.distill.attention <= 0:
        return None
    names = stage.distill.attention_layers or default_layers(stage.model)
    return FeatureTap(stage.model, names), FeatureTap(stage.teacher, names)


def _schedule_ede(stage: Stage, step: int, steps: int, epoch: int) -> None:
    """Set EDE's t on the binary layers for this step (or epoch, with ede.update: epoch) of the stage."""
    e, epochs = stage.ede, stage.schedule.epochs
    progress = step / max(epochs * steps - 1, 1) if e.update == "step" else epoch / max(epochs - 1, 1)
    set_ede(stage.model, ede_t(progress, e.t_min, e.t_max))


class LogPoints:
    """An epoch's ten log points: the mean training loss since the last point, the lr and, for a binary
    stage, the share of weight signs flipped since then (flips.py)."""

    def __init__(self, steps: int, flips: Optional[FlipMeter]):
        self.every, self.steps, self.flips = max(1, steps // 10), steps, flips
        self.rows: list[dict] = []
        self.last = (0, 0.0)

    def after(self, i: int, step: int, seen: int, loss_sum: float, lr: float) -> None:
        """Record a point after step `i` of the epoch (`step` of the stage) if it is one: every tenth, and the last."""
        if (i + 1) % self.every and i + 1 != self.steps:
            return
        row = {"step": step, "train_loss": (loss_sum - self.last[1]) / max(seen - self.last[0], 1), "lr": lr}
        if self.flips is not None:
            row["flip_rate"] = self.flips.rate()[0]
        self.rows.append(row)
        self.last = (seen, loss_sum)


def _finite(loss: torch.Tensor, stage: Stage, epoch: int, i: int) -> None:
    """Raise Diverged if the loss of step `i` is NaN or infinite."""
    if not torch.isfinite(loss):
        raise Diverged(f"train: loss became {float(loss)} in stage {stage.name}, epoch {epoch + 1}, "
                       f"step {i + 1}; the last good checkpoint is kept; lower the lr or set grad_clip")


def _epoch_row(stage: Stage, epoch: int, counts, val: dict, lr: float, t0: float, first_binary, two_stage,
               points: list[dict], flips) -> dict:
    """Return the metrics row of a finished epoch; counts = (samples, correct, summed loss) over all
    processes; `points`: the epoch's log points; `flips`: the meter of sign flips since the last epoch."""
    seen, correct, loss_sum = counts
    if flips is not None:
        rate, per_layer = flips.rate()
        flipped = {"flip_rate": rate, "flip_rate_layers": per_layer}
    return {"stage": stage.name, "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
            "train_top1": 100.0 * correct / max(seen, 1), **{f"val_{k}": val[k] for k in ("top1", "top5", "loss")},
            "lr": lr, "seconds": round(time.time() - t0, 2),
            **({"ede_t": first_binary.ede_t} if first_binary is not None and stage.ede is not None else {}),
            **({"mode": two_stage[0].binary_mode} if two_stage else {}),
            **(flipped if flips is not None else {}), "log": points}


def fit(stage: Stage, train_loader, val_loader, device: torch.device, start_epoch: int = 0,
        resume: Optional[dict] = None, on_epoch: Optional[Callable[[Stage, int, dict], None]] = None) -> Stage:
    """Train `stage.model` for its schedule's epochs; `on_epoch(stage, epoch, state)` checkpoints."""
    s, model = stage.schedule, stage.model
    net = training_net(model, stage.compile, device)
    steps = min(len(train_loader), s.max_steps_per_epoch or len(train_loader))
    opt, sched = make_optimizer(model, s, steps)
    _restore(opt, sched, resume)
    scaler = torch.amp.GradScaler(device.type) if stage.amp == "fp16" else None
    distill = stage.teacher is not None and stage.distill is not None and stage.distill.enabled
    first_binary = next(binary_layers(model), (None, None))[1]  # where the progress bar reads EDE's t
    binary = first_binary is not None
    penalized = binary and method_penalty(model) is not None  # once, not a module walk per step for no term
    warm = getattr(s, "w1a32_epochs", 0)
    two_stage = [m for _, m in binary_layers(model) if m.binary_mode == "W1A1"] if binary and warm else []
    taps = _attention_taps(stage) if distill else None
    flips = (FlipMeter(model), FlipMeter(model)) if binary else (None, None)  # since the last log point, epoch
    for epoch in range(start_epoch, s.epochs):
        _seed_epoch(stage, train_loader, epoch)
        for m in two_stage:  # two-stage schedule: W1A32 for the first w1a32_epochs epochs, then W1A1
            m.binary_mode = "W1A32" if epoch < warm else "W1A1"
        model.train()
        t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
        points = LogPoints(steps, flips[0])
        main = not dist.is_initialized() or dist.get_rank() == 0
        bar = tqdm(total=steps, desc=f"{stage.name} {epoch + 1}/{s.epochs}", leave=False, disable=None if main else True)
        lines = main and not sys.stderr.isatty()  # no bar in a log file: a line per tenth of the epoch instead
        for i, (x, y) in enumerate(train_loader):
            if i >= steps:
                break
            step = epoch * steps + i
            if binary and stage.ede is not None:
                _schedule_ede(stage, step, steps, epoch)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, stage.amp):
                out, loss = _loss(stage, net, x, y, distill, penalized, taps)
            _finite(loss, stage, epoch, i)
            _step(model, loss, opt, scaler, s.grad_clip, s.grad_clip_mode)
            if sched is not None:
                sched.step_update(step + 1)
            seen += len(y)
            correct += int((out.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
            points.after(i, step + 1, seen, loss_sum, opt.param_groups[0]["lr"])
            _progress(bar, lines, f"{stage.name} epoch {epoch + 1}/{s.epochs}", i, steps, loss_sum / seen,
                      100 * correct / seen, lr=f"{opt.param_groups[0]['lr']:.2e}",
                      **({"t": f"{first_binary.ede_t:.3g}"} if binary and stage.ede else {}))
        bar.close()
        reestimate_bn(model, train_loader, s.bn_reestimate if epoch + 1 == s.epochs else 0, device)
        row = _epoch_row(stage, epoch, sum_all([seen, correct, loss_sum]), evaluate(model, val_loader, device, stage.amp),
                         opt.param_groups[0]["lr"], t0, first_binary, two_stage, points.rows, flips[1])
        stage.history.append(row)
        if main:
            tqdm.write(f"{stage.name} epoch {epoch + 1}/{s.epochs}: loss {row['train_loss']:.4f}  "
                       f"val top-1 {row['val_top1']:.2f}%  ({row['seconds']:.0f}s)", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(stage, epoch + 1, {"optimizer": opt.state_dict(), "scheduler": sched and sched.state_dict()})
    for tap in taps or ():
        tap.close()
    return stage
