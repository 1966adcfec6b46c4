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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import distributed
from .errors import IRConvertError
from .fileformat import atomic_path, write_text
from .models import from_origin
from .recipe import Recipe, load_recipe
from .layer_summary import Summary, summary
from .swap import binarize
from .train import Stage
from .verify import load, load_packed, max_abs_diff
from .version import __version__
from .write import save_latent, save_packed

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "report.json", "curves.png", "model.safetensors",
             "packed.safetensors", "recipe.yaml")


def prepare_out_dir(out: Path, digest: str, resume: bool, overwrite: bool) -> Optional[dict]:
    """Check the output folder before anything is written; return the checkpoint to resume, if any."""
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise IRConvertError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return None
    if out.is_file():
        raise IRConvertError(f"output.dir: {out} is a file; choose a folder")
    if not (out / "recipe.yaml").is_file():
        raise IRConvertError(f"output.dir: {out} is not empty and holds no irconvert run; choose another --out")
    if resume:
        ckpt = out / CHECKPOINT
        if not ckpt.is_file():
            raise IRConvertError(f"--resume: {out} has no {CHECKPOINT} (the run wrote none); start again with --overwrite")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state.get("recipe_hash") != digest:
            raise IRConvertError(f"--resume: {out} was made by a different recipe (hash {state.get('recipe_hash')}, "
                                 f"now {digest}); use the same recipe and --set values, or another --out")
        return state
    if overwrite:
        return None
    raise IRConvertError(f"output.dir: {out} already holds a run; pass --resume to continue it, "
                         "--overwrite to replace it, or another --out")


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

    @classmethod
    def open(cls, out: Path, recipe: Recipe, resume: bool, overwrite: bool, main: bool) -> "RunFolder":
        """Check the folder (resume, overwrite), then on the main process clear it and write recipe.yaml."""
        state = prepare_out_dir(out, recipe.digest(), resume, overwrite)
        distributed.barrier()  # every process has checked the folder before the first one writes to it
        if main:
            if overwrite and out.exists() and state is None:
                for name in RUN_FILES:
                    (out / name).unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "recipe.yaml", recipe.to_yaml())
        return cls(out, recipe, main, state)

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
        if self.recipe.output.checkpoint:
            body = {"recipe_hash": self.recipe.digest(), "stage": stage.name, "epoch": epoch,
                    "model": stage.model.state_dict(),
                    "origin": json.dumps(getattr(self.teacher, "irconvert_origin", None)),
                    "input_size": json.dumps(list(self.input_size or ())),
                    "teacher": self.teacher.state_dict(), "history": self._rows(), **opt_state}
            with atomic_path(self.out / CHECKPOINT) as tmp:
                torch.save(body, tmp)
        self.write_metrics()

    def _rows(self) -> list[dict]:
        return [r for st in self.stages for r in st.history]

    def write_metrics(self) -> None:
        """Write metrics.jsonl: one line per epoch and stage."""
        lines = [json.dumps(row) for row in self._rows()]
        write_text(self.out / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))

    def export(self, student: nn.Module, x: torch.Tensor, log=print) -> tuple[nn.Module, Optional[float]]:
        """Write model.safetensors and packed.safetensors (if output.export); return the student on
        the CPU and max |student - packed reload| on `x` (None without export)."""
        student = student.cpu().eval()
        student.irconvert_input_size = self.input_size
        if not self.recipe.output.export:
            return student, None
        log("[4/4] exporting and verifying")
        self.files = write_files(student, self.out, self.recipe.digest())
        return student, max_abs_diff(student, load_packed(self.out / "packed.safetensors"), x.cpu())

    def finish(self, student: nn.Module, acc: dict, verified: Optional[float], seconds: dict, log=print) -> dict:
        """Write report.json, curves.png and metrics.jsonl; log the table and the accuracies; return the report."""
        r = self.recipe
        size = summary(student, self.input_size)
        report = report_fields(r.model.name, r.binarize, size, verified, seconds, self.files,
                               source=r.model.source, recipe_hash=r.digest(), **acc)
        write_text(self.out / "report.json", json.dumps(report, indent=2))
        if r.output.plot:
            plot_curves(self.out / "curves.png", self.stages)
        self.write_metrics()
        log(str(size))
        log(f"top-1: full precision {acc['fp']['top1']:.2f}%   binary ({r.binarize.mode}) {acc['binary']['top1']:.2f}%   "
            f"packed reload max |diff| {verified if verified is not None else 'n/a'}")
        log(f"wrote {self.out}")
        return report


def report_fields(model: str, policy, size: Summary, diff: Optional[float], seconds: dict, files: dict,
                  **extra) -> dict:
    """Return the fields every report.json has (a run's and a --convert-only check's), `extra` after the model."""
    return {
        "irconvert_version": __version__,
        "model": model,
        **extra,
        "mode": policy.mode,
        "method": policy.method,
        "packed_max_abs_diff": diff,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "size": {k: v for k, v in size.to_dict().items() if k != "rows"},
        "binary_layers": sum(row.binary != "fp32" for row in size.rows),
        "kept_layers": sum(row.binary == "fp32" for row in size.rows),
        "files": files,
    }


def write_files(student: nn.Module, out: Path, digest: Optional[str] = None) -> dict[str, str]:
    """Write model.safetensors and packed.safetensors into `out`; return their paths."""
    return {"model": str(save_latent(student, out / "model.safetensors", digest)),
            "packed": str(save_packed(student, out / "packed.safetensors", digest))}


def reload_diff(student: nn.Module, out: Path, x: torch.Tensor) -> float:
    """Return the larger max |diff| of the packed and the latent file's reload against `student` on `x`."""
    return max(max_abs_diff(student, load_packed(out / "packed.safetensors"), x),
               max_abs_diff(student, load(out / "model.safetensors"), x))


def plot_curves(path: Path, stages: list[Stage]) -> None:
    """Write loss and accuracy per epoch of both stages to a PNG."""
    import matplotlib  # only runs that plot pay for it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for st in stages:
        if not st.history:
            continue
        ep = [r["epoch"] for r in st.history]
        ax1.plot(ep, [r["train_loss"] for r in st.history], marker="o", label=f"{st.name} train")
        ax1.plot(ep, [r["val_loss"] for r in st.history], marker="x", ls="--", label=f"{st.name} val")
        ax2.plot(ep, [r["val_top1"] for r in st.history], marker="o", label=f"{st.name} val top-1")
    ax1.set(xlabel="epoch", ylabel="loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="top-1 (%)", title="validation accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def export_run(path: Union[str, os.PathLike], overwrite: bool = False, log=print) -> dict[str, str]:
    """Write model.safetensors and packed.safetensors from a run folder (its checkpoint) or a model.safetensors."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        student, out, digest = load(path), path.parent, None
        targets = {"packed": out / "packed.safetensors"}
    else:
        student, out, digest = _student_from_checkpoint(path)
        targets = {"model": out / "model.safetensors", "packed": out / "packed.safetensors"}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise IRConvertError(f"export: {', '.join(existing)} already exist; pass --overwrite to replace them")
    student = student.cpu().eval()
    written = {}
    if "model" in targets:
        written["model"] = str(save_latent(student, targets["model"], digest))
    written["packed"] = str(save_packed(student, targets["packed"], digest))
    for v in written.values():
        log(f"wrote {v}")
    return written


def _student_from_checkpoint(path: Path) -> tuple[nn.Module, Path, str]:
    """Rebuild the binary model of a run folder's (or a checkpoint file's) last binary epoch."""
    run = path if path.is_dir() else path.parent
    ckpt = path if path.is_file() else run / CHECKPOINT
    if not (run / "recipe.yaml").is_file() or not ckpt.is_file():
        raise IRConvertError(f"{path}: not a run folder with recipe.yaml and {CHECKPOINT}, "
                             "nor a model.safetensors; pass one of those")
    recipe = load_recipe(run / "recipe.yaml")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    if state.get("stage") != "binary":
        raise IRConvertError(f"{ckpt}: the run has not reached the binary stage yet; resume it first")
    origin = json.loads(state.get("origin") or "null")
    if not origin:
        raise IRConvertError(f"{ckpt}: holds no model origin (a user model); export it from Python with save_packed")
    fp = from_origin(origin)
    # binarize the same FP weights the run binarized: the per-layer gains come from them
    fp.load_state_dict(state["teacher"])
    student = binarize(fp, recipe.binarize)
    student.load_state_dict(state["model"])
    student.irconvert_input_size = tuple(json.loads(state.get("input_size") or "[]")) or None
    return student, run, state["recipe_hash"]
