"""The run folder: what a run leaves on disk, and how a run picks up where it stopped.

    recipe.yaml        the resolved recipe (its hash ties checkpoint and files to it)
    checkpoint.pt      end of the last finished epoch: weights, optimizer, history (weights_only load)
    metrics.jsonl      one line per epoch and stage
    report.json        accuracies, seconds per phase, sizes, recipe hash
    curves.png         loss and accuracy per epoch
    model.safetensors, packed.safetensors   the exported model (write.py)

Only the main process writes; every process reads the checkpoint on --resume.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import yaml
from torch import nn

from . import distributed
from .data import build_data, calibration_batch
from .errors import IRConvertError, flag, result_log
from .fileformat import atomic_path, describe, write_text
from .models import from_origin
from .plan import method_label
from .recipe import Recipe, load_recipe, validate
from .layer_summary import Summary, summary
from .swap import binarize
from .train import Diverged, Stage
from .verify import load, load_packed, max_abs_diff, rebuild
from .version import __version__
from .write import save_latent, save_packed

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "report.json", "curves.png", "model.safetensors",
             "packed.safetensors", "recipe.yaml")


def check_out_path(out: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that is a file or lies under one, and --resume with --overwrite,
    before anything is loaded or written."""
    if resume and overwrite:
        raise IRConvertError(f"{flag('resume', label=True)} and {flag('overwrite')}: pass one of them (continue the run, "
                             "or replace it)")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == out else f"lies under {p}, which is a file"
            raise IRConvertError(f"output.dir: {out} {where}; choose a folder")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise IRConvertError(f"output.dir: {out} is not writable; choose another {flag('out')}")


def read_checkpoint(path: Path) -> dict:
    """Return a run's checkpoint (weights_only load), or raise IRConvertError if it is not a whole one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle with other globals, not a torch file at all
        raise IRConvertError(f"{path}: not a readable irconvert checkpoint ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:100]}); start the run again with {flag('overwrite')}") from None
    keys = ("recipe_hash", "stage", "epoch", "model", "teacher", "history", "optimizer")
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise IRConvertError(f"{path}: not an irconvert checkpoint (it lacks {', '.join(keys)}); "
                             f"start the run again with {flag('overwrite')}")
    return state


def prepare_out_dir(out: Path, digest: str, resume: bool, overwrite: bool) -> Optional[dict]:
    """Check the output folder before anything is written; return the checkpoint to resume, if any."""
    check_out_path(out, resume, overwrite)
    entries = list(out.iterdir()) if out.exists() else []
    if not entries:
        if resume:
            raise IRConvertError(f"{flag('resume', label=True)}: {out} holds no run to resume; drop {flag('resume')} to start one")
        return None
    if all(_partial(p) for p in entries):  # killed while writing its first file: nothing to keep
        return None
    if not (out / "recipe.yaml").is_file():
        raise IRConvertError(f"output.dir: {out} is not empty and holds no irconvert run; choose another {flag('out')}")
    if (out / "report.json").is_file():  # finish() writes it last: the run is done, whatever else is there
        what = f"{flag('resume', label=True)}: nothing to continue" if resume else "output.dir"
        raise IRConvertError(f"{what}: {out} holds a finished run (report.json); pass {flag('overwrite')} to run it "
                             f"again, or another {flag('out')}")
    if resume:
        ckpt = out / CHECKPOINT
        if not ckpt.is_file():  # stopped before its first checkpoint: resuming is starting again
            _same_recipe(out, digest)
            return None
        state = read_checkpoint(ckpt)
        if state.get("recipe_hash") != digest:
            raise IRConvertError(f"{flag('resume', label=True)}: {out} was made by a different recipe (hash "
                                 f"{state.get('recipe_hash')}, now {digest}); use the same recipe and overrides, "
                                 f"or another {flag('out')}")
        return state
    if overwrite:
        return None
    raise IRConvertError(f"output.dir: {out} already holds a run; pass {flag('resume')} to continue it, "
                         f"{flag('overwrite')} to replace it, or another {flag('out')}")


def finished_run(out: Path, digest: str, resume: bool) -> Optional[dict]:
    """Return the report of the finished run in `out` when --resume asks to continue it (there is
    nothing left to do), else None; a finished run of another recipe is refused."""
    if not resume or not (out / "report.json").is_file() or not (out / "recipe.yaml").is_file():
        return None
    _same_recipe(out, digest)
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        report = None
    if not isinstance(report, dict):
        raise IRConvertError(f"{out / 'report.json'}: is not a readable report, so the run cannot be told finished; "
                             f"pass {flag('overwrite')} to run it again")
    return report


def _partial(p: Path) -> bool:
    """Whether `p` is a temporary file of fileformat.atomic_path (`.NAME.XXXX.tmp`)."""
    return p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file()


def _same_recipe(out: Path, digest: str) -> None:
    """Refuse to resume a run folder whose recipe.yaml is not the recipe given now."""
    theirs = load_recipe(out / "recipe.yaml").digest()
    if theirs != digest:
        raise IRConvertError(f"{flag('resume', label=True)}: {out} was made by a different recipe (hash {theirs}, "
                             f"now {digest}); use the same recipe and overrides, or another {flag('out')}")


def tensorboard_writer():
    """Return TensorBoard's SummaryWriter class, or raise the install hint (checked before anything is written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise IRConvertError("output.tensorboard: TensorBoard is not installed; pip install tensorboard "
                             "(or irconvert[tensorboard]), or set output.tensorboard: false") from None
    return SummaryWriter


def out_dir(out: Union[str, os.PathLike, None], recipe: Recipe) -> Path:
    """Return --out, else the recipe's output.dir, else runs/<model name>."""
    return Path(out if out is not None else recipe.output.dir or Path("runs") / recipe.model.name.replace("/", "_"))


@dataclass
class RunFolder:
    """One run's folder: checkpoints during training, the files and the report at the end."""

    out: Path
    recipe: Recipe
    main: bool
    state: Optional[dict] = None  # the checkpoint resumed from
    stages: list[Stage] = field(default_factory=list)
    teacher: Optional[nn.Module] = None  # the FP model whose weights and origin checkpoints record
    input_size: Optional[tuple[int, int, int]] = None
    files: dict[str, str] = field(default_factory=dict)
    kept: Optional[tuple[str, int]] = None  # (stage, epoch) of the checkpoint this run wrote last
    writer: Optional[object] = None  # TensorBoard's SummaryWriter (output.tensorboard)

    @classmethod
    def open(cls, out: Path, recipe: Recipe, resume: bool, overwrite: bool, main: bool) -> "RunFolder":
        """Check the folder (resume, overwrite), then on the main process clear it and write recipe.yaml."""
        state = prepare_out_dir(out, recipe.digest(), resume, overwrite)
        writer_class = tensorboard_writer() if recipe.output.tensorboard and main else None
        distributed.barrier()  # every process has checked the folder before the first one writes to it
        if main:
            if overwrite and out.exists() and state is None:
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            remove_partial_files(out)
            write_text(out / "recipe.yaml", recipe.to_yaml())
        writer = writer_class(log_dir=str(out / "tensorboard")) if writer_class else None
        return cls(out, recipe, main, state, writer=writer)

    def history(self, stage: str) -> list[dict]:
        """Return the resumed checkpoint's metric rows of `stage` (none on a fresh run)."""
        return [r for r in (self.state or {}).get("history", []) if r["stage"] == stage]

    def resume_point(self, stage: str, done_epochs: int) -> tuple[int, Optional[dict]]:
        """Return (first epoch, checkpoint with optimizer state or None) for `stage`; `done_epochs`
        is where it starts when the checkpoint is of another (later) stage."""
        if self.state is None:
            return 0, None
        if self.state["stage"] == stage:
            return self.state["epoch"], self.state
        return done_epochs, None

    def checkpoint(self, stage: Stage, epoch: int, opt_state: dict) -> None:
        """Save the end of `epoch` of `stage` (fit's on_epoch) and the metrics so far."""
        if not self.main:
            return
        bad = _non_finite(stage)
        if bad:
            self.write_metrics()
            kept = (f"the checkpoint of {self.state_label()} is kept" if (self.out / CHECKPOINT).is_file()
                    else "no checkpoint was kept")
            raise Diverged(f"train: {bad} after {stage.name} epoch {epoch}; {kept}; "
                           f"lower the lr or set train.grad_clip, then start again with {flag('overwrite')}")
        if self.recipe.output.checkpoint:
            body = {"recipe_hash": self.recipe.digest(), "recipe": self.recipe.to_yaml(), "stage": stage.name, "epoch": epoch,
                    "model": stage.model.state_dict(),
                    "origin": json.dumps(getattr(self.teacher, "irconvert_origin", None)),
                    "input_size": json.dumps(list(self.input_size or ())),
                    "teacher": self.teacher.state_dict(), "history": self._rows(), **opt_state}
            if getattr(stage.model, "irconvert_plan", None) is not None:  # export rebuilds it without data
                body["binarization"] = json.dumps(describe(stage.model))
            with atomic_path(self.out / CHECKPOINT) as tmp:
                torch.save(body, tmp)
            self.kept = (stage.name, epoch)
        self.write_metrics()
        if self.writer is not None and stage.history:
            row = stage.history[-1]
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(f"{stage.name}/{key}", value, row["epoch"])
            for point in row.get("log", ()):  # the log points, by the stage's step
                for key in ("train_loss", "flip_rate"):
                    if key in point:
                        self.writer.add_scalar(f"{stage.name}/step/{key}", point[key], point["step"])
            for layer, value in row.get("flip_rate_layers", {}).items():
                self.writer.add_scalar(f"{stage.name}/flip_rate/{layer}", value, row["epoch"])
            self.writer.flush()

    def state_label(self) -> str:
        """Return 'STAGE epoch N' of the checkpoint on disk (this run's, else the one resumed from)."""
        stage, epoch = self.kept or ((self.state["stage"], self.state["epoch"]) if self.state else ("?", "?"))
        return f"{stage} epoch {epoch}"

    def _rows(self) -> list[dict]:
        return [r for st in self.stages for r in st.history]

    def write_metrics(self) -> None:
        """Write metrics.jsonl: one line per epoch and stage."""
        lines = [json.dumps(json_safe(row), allow_nan=False) for row in self._rows()]
        write_text(self.out / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))

    def export(self, student: nn.Module, x: torch.Tensor, log=print) -> tuple[nn.Module, Optional[float]]:
        """Write model.safetensors and packed.safetensors (if output.export); return the student on
        the CPU and max |student - packed reload| on `x` (None without export)."""
        student = student.cpu().eval()
        student.irconvert_input_size = self.input_size
        if not self.recipe.output.export:
            return student, None
        log("      writing model.safetensors and packed.safetensors, and checking that the packed file reloads "
            "to the same outputs")
        self.files = write_files(student, self.out, self.recipe.digest())
        return student, max_abs_diff(student, load_packed(self.out / "packed.safetensors"), x.cpu())

    def finish(self, student: nn.Module, acc: dict, verified: Optional[float], seconds: dict, log=print,
               world: Optional[distributed.World] = None, device: Optional[torch.device] = None) -> dict:
        """Write report.json, curves.png and metrics.jsonl; log the table and the accuracies; return the report."""
        r = self.recipe
        size = summary(student, self.input_size)
        report = report_fields(r.model.name, r.binarize, size, verified, seconds, self.files,
                               plan=getattr(student, "irconvert_plan", None), source=r.model.source, recipe_hash=r.digest(), **acc,
                               **run_place(world or distributed.World(), device))
        write_text(self.out / "report.json", json.dumps(json_safe(report), indent=2, allow_nan=False))
        if r.output.plot:
            title = (f"{r.model.name}: {method_label(r.binarize, getattr(student, 'irconvert_plan', None))} "
                     f"{r.binarize.mode} on {r.data.dataset}")
            plot_curves(self.out / "curves.png", self.stages, title, acc["fp"]["top1"], r.train.distill.enabled,
                        r.train.distill.alpha)
        self.write_metrics()
        if self.writer is not None:
            self.writer.close()
        if self.files and not r.output.keep_checkpoint:  # exported: the checkpoint is no longer needed
            (self.out / CHECKPOINT).unlink(missing_ok=True)
        log = result_log(log)
        log(str(size))
        log(f"top-1: full precision {acc['fp']['top1']:.2f}%   binary ({r.binarize.mode}) {acc['binary']['top1']:.2f}%   "
            f"packed reload max |diff| {verified if verified is not None else 'n/a'}")
        log(f"wrote {self.out}")
        return report


def _non_finite(stage: Stage) -> Optional[str]:
    """Return what is not finite at the end of an epoch (the weights, the losses), or None: a
    checkpoint is only kept when a resumed run could go on from it."""
    row = stage.history[-1] if stage.history else {}
    for key in ("train_loss", "val_loss"):
        if key in row and not math.isfinite(row[key]):
            return f"{key.replace('_', ' ')} is {row[key]}"
    for name, t in stage.model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"weight {name} holds non-finite values"
    return None


def json_safe(value):
    """Return `value` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def remove_partial_files(out: Path) -> None:
    """Delete the temporary files (`.NAME.XXXX.tmp`, fileformat.atomic_path) a killed run left in `out`."""
    for tmp in out.iterdir():
        if _partial(tmp):
            tmp.unlink(missing_ok=True)


def report_fields(model: str, policy, size: Summary, diff: Optional[float], seconds: dict, files: dict,
                  plan=None, **extra) -> dict:
    """Return the fields every report.json has (a run's and a --convert-only check's), `extra` after the model."""
    return {
        "irconvert_version": __version__,
        "model": model,
        **extra,
        "mode": policy.mode,
        "method": policy.method,
        "method_as_trained": method_label(policy, plan),
        "packed_max_abs_diff": diff,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "size": {k: v for k, v in size.to_dict().items() if k != "rows"},
        "binary_layers": sum(row.binary != "fp32" for row in size.rows),
        "kept_layers": sum(row.binary == "fp32" for row in size.rows),
        "files": files,
        "file_bytes": {k: os.path.getsize(v) for k, v in files.items() if os.path.isfile(v)},
    }


def run_place(world: distributed.World, device: Optional[torch.device]) -> dict:
    """Return where a run ran: its processes, the device type, and how many devices they shared (one GPU per
    process, distributed.start; one CPU per machine, torchrun's LOCAL_WORLD_SIZE processes on each)."""
    if device is None:
        return {"processes": world.size}
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world.size)))
    devices = world.size if device.type == "cuda" else max(1, world.size // per_machine)
    return {"processes": world.size, "device": device.type, "devices": devices}


def write_files(student: nn.Module, out: Path, digest: Optional[str] = None) -> dict[str, str]:
    """Write model.safetensors and packed.safetensors into `out`; return their paths."""
    return {"model": str(save_latent(student, out / "model.safetensors", digest)),
            "packed": str(save_packed(student, out / "packed.safetensors", digest))}


def reload_diff(student: nn.Module, out: Path, x: torch.Tensor) -> float:
    """Return the larger max |diff| of the packed and the latent file's reload against `student` on `x`."""
    return max(max_abs_diff(student, load_packed(out / "packed.safetensors"), x),
               max_abs_diff(student, load(out / "model.safetensors"), x))


def _loss_label(kd: bool, alpha: Optional[float]) -> str:
    """Return what the binary stage's training loss is: CE, KD (alpha 1) or KD + CE."""
    if not kd or alpha == 0:
        return "CE"
    return "KD" if alpha == 1 else "KD + CE"


def _steps(st: Stage, offset: float) -> tuple[list[float], list[dict]]:
    """Return (x in epochs across the stages, rows) of a stage's log points, or of its epoch rows where
    its history has none (a run from before the log points)."""
    rows = [r for r in st.history if r.get("log")]
    if not rows:
        return [offset + r["epoch"] for r in st.history], list(st.history)
    per_epoch = rows[0]["log"][-1]["step"] / rows[0]["epoch"]  # an epoch's last point is at epoch * steps
    points = [p for r in rows for p in r["log"]]
    return [offset + p["step"] / per_epoch for p in points], points


def plot_curves(path: Path, stages: list[Stage], title: str = "", fp_top1: Optional[float] = None,
                kd: bool = False, alpha: Optional[float] = None) -> None:
    """Write the curves of a run to a PNG: cross-entropies, the binary stage's training loss on its own
    axes (with KD it is not a cross-entropy), validation top-1 with the FP model's as a reference line,
    and the binary weights' sign-flip rate. Training losses are drawn per log point (ten an epoch),
    validation per epoch; the x axis counts epochs across the stages (the teacher's first)."""
    import matplotlib  # only runs that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ce, train, acc, flips) = plt.subplots(1, 4, figsize=(16, 3.8))
    offset = 0
    for st in stages:
        if not st.history:
            continue
        ep = [offset + r["epoch"] for r in st.history]
        xs, points = _steps(st, offset)
        style = dict(marker="o", ms=4)
        if st.name != "binary" or not kd:
            ce.plot(xs, [p["train_loss"] for p in points], label=f"{st.name} train")
        ce.plot(ep, [r["val_loss"] for r in st.history], ls="--", label=f"{st.name} validation", **style)
        if st.name == "binary":
            train.plot(xs, [p["train_loss"] for p in points], color="C3")
            rates = [(x, 100 * p["flip_rate"]) for x, p in zip(xs, points) if p.get("flip_rate") is not None]
            if rates:
                flips.plot(*zip(*rates), color="C4", ms=3, marker=".")
        acc.plot(ep, [r["val_top1"] for r in st.history], label=f"{st.name} validation", **style)
        offset = ep[-1]
        if st.name != "binary":  # where the binary stage starts
            for ax in (ce, acc, flips):
                ax.axvline(offset, color="0.7", lw=0.8)
    if fp_top1 is not None:
        acc.axhline(fp_top1, color="0.4", ls=":", label=f"FP model {fp_top1:.2f}%")
    ce.set(xlabel="epoch", ylabel="cross-entropy", title="cross-entropy")
    train.set(xlabel="epoch", ylabel="loss", title=f"binary training loss ({_loss_label(kd, alpha)})")
    acc.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    flips.set(xlabel="epoch", ylabel="signs flipped (%)", title="binary weight sign flips per log point")
    for ax in (ce, train, acc, flips):
        ax.set_xlim(0, max(offset, 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    for ax in (ce, acc):
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def export_run(path: Union[str, os.PathLike], out: Union[str, os.PathLike, None] = None,
               recipe: Union[str, os.PathLike, None] = None, overwrite: bool = False, log=print) -> dict[str, str]:
    """Write model.safetensors and packed.safetensors from a run folder (its checkpoint, else its
    model.safetensors), a checkpoint.pt, or a model.safetensors, into `out` (default: beside the input);
    return their paths. A file already there with the same contents is left as it is."""
    path = Path(path)
    if path.is_dir() and not (path / CHECKPOINT).is_file() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"  # a finished run whose checkpoint was removed
    if path.is_file() and path.suffix == ".safetensors":
        student, digest, home = load(path), _metadata(path).get("recipe_hash") or None, path.parent
        target = Path(out) if out else home
        # both files in the target folder: the latent one there is this very file, or a copy written from it
        names = ("packed",) if _same_file(target / "model.safetensors", path) else ("model", "packed")
        files = _write_changed(student.cpu().eval(), target, names, digest, overwrite, log)
        return {"model": str(target / "model.safetensors"), **files}
    student, home, digest = _student_from_checkpoint(path, recipe)
    return _write_changed(student.cpu().eval(), Path(out) if out else home, ("model", "packed"), digest, overwrite, log)


def _same_file(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and os.path.samefile(a, b)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # unreadable: the file differs from anything export writes
        return {}


def _write_changed(student: nn.Module, out: Path, names: tuple[str, ...], digest: Optional[str], overwrite: bool,
                   log=print) -> dict[str, str]:
    """Write each named file to a temporary name, then keep the file already there where it has the same
    metadata (which holds the SHA-256 of every tensor), refuse to replace one that differs unless
    `overwrite`, and rename the rest into place."""
    if out.exists() and not out.is_dir():
        raise IRConvertError(f"{flag('out', label=True)}: {out} is a file; choose a folder")
    save = {"model": save_latent, "packed": save_packed}
    targets = {n: out / f"{n}.safetensors" for n in names}
    tmp = {n: out / f".{n}.safetensors.export.tmp" for n in names}
    out.mkdir(parents=True, exist_ok=True)
    try:
        for n in names:
            save[n](student, tmp[n], digest)
        same = {n: targets[n].is_file() and _metadata(targets[n]) == _metadata(tmp[n]) for n in names}
        clash = [str(targets[n]) for n in names if targets[n].exists() and not same[n]]
        if clash and not overwrite:
            raise IRConvertError(f"export: {', '.join(clash)} already exist with other contents; pass {flag('overwrite')} "
                                 f"to replace them, or {flag('out')} to write elsewhere")
        for n in names:
            if same[n]:
                result_log(log)(f"{targets[n]} is up to date")
            else:
                os.replace(tmp[n], targets[n])
                result_log(log)(f"wrote {targets[n]}")
        return {n: str(t) for n, t in targets.items()}
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)


def _checkpoint_recipe(state: dict, ckpt: Path, recipe: Union[str, os.PathLike, None]) -> Recipe:
    """Return the recipe of a checkpoint: the one it holds, else --recipe, else recipe.yaml beside it;
    it must have the checkpoint's recipe hash."""
    beside = ckpt.parent / "recipe.yaml"
    if state.get("recipe"):
        found = validate(yaml.safe_load(state["recipe"]), str(ckpt))
    elif recipe is not None or beside.is_file():
        found = load_recipe(recipe if recipe is not None else beside)
    else:
        raise IRConvertError(f"{ckpt}: holds no recipe and has no recipe.yaml beside it; pass the run's recipe "
                             f"with {flag('recipe')} (its recipe.yaml)")
    if found.digest() != state.get("recipe_hash"):
        raise IRConvertError(f"{recipe or beside}: is not the recipe of {ckpt} (hash {found.digest()}, checkpoint "
                             f"{state.get('recipe_hash')}); pass the run's recipe.yaml with {flag('recipe')}")
    return found


def _student_from_checkpoint(path: Path, recipe: Union[str, os.PathLike, None] = None) -> tuple[nn.Module, Path, str]:
    """Rebuild the binary model of a run folder's (or a checkpoint file's) last binary epoch."""
    run = path if path.is_dir() else path.parent
    ckpt = path if path.is_file() else run / CHECKPOINT
    if not ckpt.is_file():
        raise IRConvertError(f"{path}: not a run folder with {CHECKPOINT} or model.safetensors, nor a checkpoint "
                             "or a model.safetensors; pass one of those")
    state = read_checkpoint(ckpt)
    if state.get("stage") != "binary":
        raise IRConvertError(f"{ckpt}: the run has not reached the binary stage yet; resume it first")
    origin = json.loads(state.get("origin") or "null")
    if not origin:
        raise IRConvertError(f"{ckpt}: holds no model origin (a user model); export it from Python with save_packed")
    found = _checkpoint_recipe(state, ckpt, recipe)
    if state.get("binarization"):  # the plan as trained: no calibration data needed, no second calibration
        try:
            described = json.loads(state["binarization"])
        except (TypeError, ValueError):
            raise IRConvertError(f"{ckpt}: its 'binarization' entry is not valid JSON; the checkpoint is damaged")
        student = rebuild(described, ckpt, state["model"])
        student.irconvert_input_size = tuple(json.loads(state.get("input_size") or "[]")) or None
        return student, run, state["recipe_hash"]
    # a checkpoint from before checkpoints held the plan
    fp = from_origin(origin)
    # binarize the same FP weights the run binarized: the per-layer gains come from them
    fp.load_state_dict(state["teacher"])
    # the same calibration batch as the run, so that the same layers are W1A32 and Hardtanh
    student = binarize(fp, found.binarize, calibrate=calibration_batch(build_data(found.data)))
    student.load_state_dict(state["model"])
    student.irconvert_input_size = tuple(json.loads(state.get("input_size") or "[]")) or None
    return student, run, state["recipe_hash"]
