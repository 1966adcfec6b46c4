"""One conversion run, top to bottom, as the CLI and notebooks run it:

    load -> (fine-tune the FP teacher) -> binarize -> binary fine-tune with KD and EDE
         -> evaluate FP and binary -> export and verify -> report

`run` is the phases in order, one named call each; what a run keeps on disk (checkpoint, resume,
metrics, report, plot) is `runfolder.py`. `convert_only` is the CI check: binarize, export, verify.
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from torch import nn

from . import distributed
from .data import Data, build_data
from .errors import IRConvertError, logged_warnings
from .fileformat import write_text
from .models import create_model, split_name
from .recipe import Recipe, resolve_recipe
from .runfolder import RunFolder, out_dir, reload_diff, report_fields, write_files
from .layer_summary import default_input_size, summary
from .swap import binarize
from .train import Stage, evaluate, fit


def run(model: Union[str, nn.Module, None], recipe: Union[Recipe, str, os.PathLike],
        out: Union[str, os.PathLike, None] = None, *, weights: Optional[str] = None, overrides: tuple[str, ...] = (),
        resume: bool = False, overwrite: bool = False, seed: Optional[int] = None, device: Optional[str] = None,
        log=print) -> dict:
    """Run the recipe on `model` (a name, overriding the recipe's, or a module) and return the report."""
    recipe = resolve_recipe(recipe, overrides, _fields(model, seed, device))
    dev, world = distributed.start(recipe.train.device, recipe.train.backend)
    log = log if world.main else (lambda *a, **k: None)  # one process speaks
    clock = Clock()

    # -- load: data and the FP model; every input error is found before the first file is written
    with clock("load"):
        data = build_data(recipe.data)
        torch.manual_seed(recipe.train.seed)  # a random-init model is the same again on --resume
        fp = model if isinstance(model, nn.Module) else build_model(recipe, data, weights)
    folder = RunFolder.open(out_dir(out, recipe), recipe, resume, overwrite, world.main)
    folder.teacher, folder.input_size = fp, (data.info.in_chans, data.info.image_size, data.info.image_size)
    if recipe.train.sync_bn and world.size > 1:
        fp = folder.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(fp)
    fp = fp.to(dev)
    loaders = data.loaders(recipe.data, torch.Generator(), recipe.train.seed, world.rank, world.size)
    # -- teacher: fine-tune the FP model on this data (optional); it is the distillation teacher
    with clock("teacher"):
        finetune_teacher(fp, folder, loaders, dev, log)
    # -- binarize: analyze -> plan -> swap
    with clock("binarize"), logged_warnings(log):
        student = binarize(fp, recipe.binarize)
    # -- binary fine-tune with distillation and EDE's schedule
    with clock("train"):
        train_binary(student, fp, folder, loaders, dev, log)
    # -- evaluate both
    with clock("evaluate"):
        log("[3/4] evaluating")
        acc = {k: evaluate(m, loaders[1], dev, recipe.train.amp) for k, m in (("fp", fp), ("binary", student))}
    if not world.main:  # the main process writes the results; the others are done
        distributed.teardown()
        return {"model": recipe.model.name, **acc, "rank": world.rank}
    # -- export and verify: pack -> write -> verify
    with clock("export"):
        student, verified = folder.export(student, next(iter(loaders[1]))[0][:16], log)
    report = folder.finish(student, acc, verified, clock.seconds, log)
    distributed.teardown()
    return report


class Clock:
    """Seconds per named phase: `with clock("train"): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t = time.time()
        yield
        self.seconds[phase] = time.time() - t


def _fields(model, seed: Optional[int], device: Optional[str]) -> dict:
    """The recipe fields the call's arguments set (a 'torchvision:NAME' model sets the source too)."""
    fields = {"train.seed": seed, "train.device": device}
    if isinstance(model, str):
        fields["model.name"] = model
        if ":" in model:
            fields["model.source"], fields["model.name"] = split_name(model)
    return fields


def build_model(recipe: Recipe, data: Data, weights: Optional[str] = None) -> nn.Module:
    """Return the full-precision model the recipe names, fitted to the data's classes and channels."""
    m = recipe.model
    kwargs = dict(m.kwargs)
    kwargs.setdefault("num_classes", data.info.num_classes)
    adapt = {"first_stride": m.first_stride, "stem_pool": m.stem_pool}
    if m.source == "timm":
        kwargs.setdefault("in_chans", data.info.in_chans)
    elif data.info.in_chans != 3:
        adapt["in_chans"] = data.info.in_chans
    return create_model(m.name, m.source, pretrained=m.pretrained, weights=weights, adapt=adapt, **kwargs)


def finetune_teacher(fp: nn.Module, folder: RunFolder, loaders, dev: torch.device, log=print) -> Stage:
    """Fine-tune the FP model for `teacher.finetune` (if set), resuming from the folder's checkpoint."""
    r = folder.recipe
    stage = Stage("teacher", fp, r.teacher.finetune or r.train, r.train.seed, amp=r.train.amp,
                  history=folder.history("teacher"))
    folder.stages.append(stage)
    if folder.state is not None:
        fp.load_state_dict(folder.state["teacher"])
    if r.teacher.finetune is not None:
        start, opt_state = folder.resume_point("teacher", r.teacher.finetune.epochs)
        log(f"[1/4] fine-tuning the full-precision teacher ({r.teacher.finetune.epochs} epochs)")
        fit(stage, *loaders, dev, start, opt_state, folder.checkpoint)
    return stage


def train_binary(student: nn.Module, fp: nn.Module, folder: RunFolder, loaders, dev: torch.device, log=print) -> Stage:
    """Train the binary model (KD from a frozen copy of `fp`, EDE), resuming from the folder's checkpoint."""
    r = folder.recipe
    teacher = None
    if r.train.distill.enabled:
        teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    stage = Stage("binary", student, r.train, r.train.seed, teacher=teacher, distill=r.train.distill,
                  ede=r.train.ede, amp=r.train.amp, history=folder.history("binary"))
    folder.stages.append(stage)
    start, opt_state = folder.resume_point("binary", 0)
    if opt_state is not None:
        student.load_state_dict(opt_state["model"])
    log(f"[2/4] training the binary model ({r.train.epochs} epochs, {len(list(student.parameters()))} tensors)")
    fit(stage, *loaders, dev, start, opt_state, folder.checkpoint)
    return stage


def convert_only(model: Union[str, nn.Module], out: Union[str, os.PathLike], policy=None,
                 weights: Optional[str] = None, input_size: Optional[tuple[int, ...]] = None,
                 overwrite: bool = False, log=print, **kwargs) -> dict:
    """Binarize, export and verify without training: the check a CI job runs on a model list."""
    out, t0 = Path(out), time.time()
    fp = model if isinstance(model, nn.Module) else create_model(model, weights=weights, pretrained=bool(weights), **kwargs)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise IRConvertError(f"output.dir: {out} is not empty; pass --overwrite or another --out")
    with logged_warnings(log):
        student = binarize(fp, policy).eval()
    size_in = tuple(input_size or default_input_size(student))
    student.irconvert_input_size = size_in
    files = write_files(student, out)
    diff = reload_diff(student, out, torch.randn((2,) + size_in, generator=torch.Generator().manual_seed(0)))
    name = model if isinstance(model, str) else type(model).__name__
    report = report_fields(name, student.irconvert_plan.policy, summary(student, size_in), diff,
                           {"total": time.time() - t0}, files,
                           file_bytes={k: os.path.getsize(v) for k, v in files.items()})
    write_text(out / "report.json", json.dumps(report, indent=2))
    log(f"{report['model']}: {report['binary_layers']} binary / {report['kept_layers']} kept layers, packed "
        f"{report['file_bytes']['packed'] / 2**20:.2f} MiB vs {report['file_bytes']['model'] / 2**20:.2f} MiB, "
        f"reload max |diff| {diff:.3g}")
    return report
