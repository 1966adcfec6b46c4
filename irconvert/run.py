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
from .data import DataInfo, build_data, calibration_batch, data_info
from .errors import IRConvertError, flag, logged_warnings, result_log
from .fileformat import write_text
from .models import create_model, split_name
from .plan import method_label, plan_counts
from .recipe import Recipe, resolve_recipe
from .runfolder import RunFolder, check_out_path, finished_run, out_dir, reload_diff, report_fields, write_files
from .layer_summary import default_input_size, summary
from .swap import binarize
from .train import Stage, check_schedule, evaluate, fit


def run(model: Union[str, nn.Module, None], recipe: Union[Recipe, str, os.PathLike],
        out: Union[str, os.PathLike, None] = None, *, weights: Optional[str] = None, overrides: tuple[str, ...] = (),
        resume: bool = False, overwrite: bool = False, seed: Optional[int] = None, device: Optional[str] = None,
        log=print) -> dict:
    """Run the recipe on `model` (a name, overriding the recipe's, or a module) and return the report."""
    recipe = resolve_recipe(recipe, overrides, _fields(model, seed, device))
    out = check_inputs(recipe, out, resume, overwrite)
    done = finished_run(out, recipe.digest(), resume)
    if done is not None:  # exit 0: the run asked for is there, so a loop re-running the resume line ends
        top1 = (done.get("binary") or {}).get("top1")
        result_log(log)(f"{out}: the run is finished (report.json{f', binary top-1 {top1:.2f}%' if isinstance(top1, (int, float)) else ''}); "
            "nothing to continue, nothing changed; pass --overwrite to run it again")
        return done
    dev, world = distributed.start(recipe.train.device, recipe.train.backend)
    log = log if world.main else (lambda *a, **k: None)  # one process speaks
    clock, t_start = Clock(), time.time()

    # -- load: data and the FP model; every input error is found before the first file is written
    with clock("load"):
        data = build_data(recipe.data)
        torch.manual_seed(recipe.train.seed)  # a random-init model is the same again on --resume
        fp = model if isinstance(model, nn.Module) else build_model(recipe, data.info, weights)
    folder = RunFolder.open(out, recipe, resume, overwrite, world.main)
    # said once every input has been checked: a bad one gets the error line alone
    log(f"[1/4] loaded {describe_model(recipe, weights) if not isinstance(model, nn.Module) else 'the model'} "
        f"and the {recipe.data.dataset} data ({len(data.train):,} training, {len(data.val):,} validation images)")
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
        student = binarize(fp, recipe.binarize, calibrate=calibration_batch(data))
    log(f"[2/4] binarized with {method_label(recipe.binarize, student.irconvert_plan)}: {plan_counts(student.irconvert_plan)}")
    # -- binary fine-tune with distillation and EDE's schedule
    with clock("train"):
        train_binary(student, fp, folder, loaders, dev, log)
    # -- evaluate both
    with clock("evaluate"):
        log(f"[4/4] evaluating the full-precision and the binary model on {len(loaders[1].dataset):,} "
            "validation images")
        acc = {k: evaluate(m, loaders[1], dev, recipe.train.amp) for k, m in (("fp", fp), ("binary", student))}
    if not world.main:  # the main process writes the results; the others are done
        distributed.teardown()
        return {"model": recipe.model.name, **acc, "rank": world.rank}
    # -- export and verify: pack -> write -> verify
    with clock("export"):
        student, verified = folder.export(student, next(iter(loaders[1]))[0][:16], log)
    clock.seconds["total"] = time.time() - t_start
    report = folder.finish(student, acc, verified, clock.seconds, log, world=world, device=dev)
    distributed.teardown()
    return report


def check_inputs(recipe: Recipe, out: Union[str, os.PathLike, None], resume: bool, overwrite: bool) -> Path:
    """Check what is cheap to check before the data and the model load: the output folder, the
    device, the optimizers of both stages; return the run folder. Data and weights are checked as
    they load, still before RunFolder.open writes the first file."""
    folder = out_dir(out, recipe)
    check_out_path(folder, resume, overwrite)
    distributed.resolve_device(recipe.train.device)
    check_schedule(recipe.train, "train")
    if recipe.teacher.finetune is not None:
        check_schedule(recipe.teacher.finetune, "teacher.finetune")
    return folder


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


def recipe_for(model: Optional[str], recipe: Union[Recipe, str, os.PathLike], overrides: tuple[str, ...] = ()) -> Recipe:
    """Return the recipe with the --set `overrides` applied and `model` (a name, if given) as its model."""
    return resolve_recipe(recipe, overrides, _fields(model, None, None))


def describe_model(recipe: Recipe, weights: Optional[str] = None) -> str:
    """Return the model a recipe loads, in words: 'resnet18 (timm) with the weights in FILE'."""
    m = recipe.model
    where = weights or m.pretrained
    source = ("random weights" if not where else "the hub's pretrained weights" if where is True
              else f"the weights in {os.path.normpath(where)}")
    return f"{m.name} ({m.source}) with {source}"


def build_model(recipe: Recipe, info: DataInfo, weights: Optional[str] = None) -> nn.Module:
    """Return the full-precision model the recipe names, fitted to the data's classes and channels."""
    m = recipe.model
    kwargs = dict(m.kwargs)
    kwargs.setdefault("num_classes", info.num_classes)
    adapt = {"first_stride": m.first_stride, "stem_pool": m.stem_pool}
    if m.source == "timm":
        kwargs.setdefault("in_chans", info.in_chans)
    elif info.in_chans != 3:
        adapt["in_chans"] = info.in_chans
    return create_model(m.name, m.source, pretrained=m.pretrained, weights=weights, adapt=adapt, **kwargs)


def finetune_teacher(fp: nn.Module, folder: RunFolder, loaders, dev: torch.device, log=print) -> Stage:
    """Fine-tune the FP model for `teacher.finetune` (if set), resuming from the folder's checkpoint."""
    r = folder.recipe
    stage = Stage("teacher", fp, r.teacher.finetune or r.train, r.train.seed, amp=r.train.amp,
                  compile=r.train.compile, history=folder.history("teacher"))
    folder.stages.append(stage)
    if folder.state is not None:
        fp.load_state_dict(folder.state["teacher"])
    if r.teacher.finetune is not None:
        start, opt_state = folder.resume_point("teacher", r.teacher.finetune.epochs)
        log(f"      fine-tuning the full-precision model on this data first ({r.teacher.finetune.epochs} "
            f"epoch{'s' if r.teacher.finetune.epochs != 1 else ''}): it is the teacher the binary model learns from")
        fit(stage, *loaders, dev, start, opt_state, folder.checkpoint)
    return stage


def train_binary(student: nn.Module, fp: nn.Module, folder: RunFolder, loaders, dev: torch.device, log=print) -> Stage:
    """Train the binary model (KD from a frozen copy of `fp`, EDE), resuming from the folder's checkpoint."""
    r = folder.recipe
    teacher = None
    if r.train.distill.enabled:
        teacher = copy.deepcopy(fp).eval().requires_grad_(False)
    stage = Stage("binary", student, r.train, r.train.seed, teacher=teacher, distill=r.train.distill,
                  ede=r.train.ede, amp=r.train.amp, compile=r.train.compile, history=folder.history("binary"))
    folder.stages.append(stage)
    start, opt_state = folder.resume_point("binary", 0)
    if opt_state is not None:
        student.load_state_dict(opt_state["model"])
    steps = min(len(loaders[0]), r.train.max_steps_per_epoch or len(loaders[0]))
    teach = (f", learning from the full-precision model (distillation)" if teacher is not None else "")
    log(f"[3/4] training the binary model: {r.train.epochs} epoch{'s' if r.train.epochs != 1 else ''} of {steps} "
        f"steps, {r.data.batch_size} images a step{teach}" + (f", from {folder.state_label()}" if start else ""))
    fit(stage, *loaders, dev, start, opt_state, folder.checkpoint)
    return stage


def convert_recipe(model: Optional[str], recipe: Union[Recipe, str, os.PathLike], out: Union[str, os.PathLike],
                   weights: Optional[str] = None, overrides: tuple[str, ...] = (), overwrite: bool = False,
                   log=print) -> dict:
    """`convert_only` of the model a recipe builds (its model section, pretrained weights, stem fixes,
    the data's classes, channels and image size) with the recipe's policy; `model` overrides its name."""
    recipe = recipe_for(model, recipe, overrides)
    info = data_info(recipe.data)
    _check_out(Path(out), overwrite)
    fp = build_model(recipe, info, weights)
    return convert_only(fp, out, recipe.binarize, input_size=(info.in_chans, info.image_size, info.image_size),
                        overwrite=overwrite, log=log, name=recipe.model.name, recipe_hash=recipe.digest())


def _check_out(out: Path, overwrite: bool) -> None:
    check_out_path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise IRConvertError(f"output.dir: {out} is not empty; pass {flag('overwrite')} or another {flag('out')}")


def convert_only(model: Union[str, nn.Module], out: Union[str, os.PathLike], policy=None,
                 weights: Optional[str] = None, input_size: Optional[tuple[int, ...]] = None,
                 overwrite: bool = False, log=print, name: Optional[str] = None, recipe_hash: Optional[str] = None,
                 **kwargs) -> dict:
    """Binarize, export and verify without training: the check a CI job runs on a model list."""
    out, t0 = Path(out), time.time()
    _check_out(out, overwrite)
    fp = model if isinstance(model, nn.Module) else create_model(model, weights=weights, pretrained=bool(weights), **kwargs)
    with logged_warnings(log):
        student = binarize(fp, policy).eval()
    size_in = tuple(input_size or default_input_size(student))
    student.irconvert_input_size = size_in
    files = write_files(student, out, recipe_hash)
    diff = reload_diff(student, out, torch.randn((2,) + size_in, generator=torch.Generator().manual_seed(0)))
    name = name or (model if isinstance(model, str) else type(model).__name__)
    report = report_fields(name, student.irconvert_plan.policy, summary(student, size_in), diff,
                           {"total": time.time() - t0}, files, plan=student.irconvert_plan)
    write_text(out / "report.json", json.dumps(report, indent=2))
    result_log(log)(f"{report['model']}: {report['binary_layers']} binary / {report['kept_layers']} kept layers, packed "
        f"{report['file_bytes']['packed'] / 2**20:.2f} MiB vs {report['file_bytes']['model'] / 2**20:.2f} MiB, "
        f"reload max |diff| {diff:.3g}")
    return report


def dry_run(model: Optional[str], recipe: Union[Recipe, str, os.PathLike, None] = None,
            out: Union[str, os.PathLike, None] = None, weights: Optional[str] = None, overrides: tuple[str, ...] = (),
            log=print) -> dict:
    """Return (and log) what a run, or with no recipe a --convert-only check, would do, writing nothing: the
    resolved recipe and the conversion plan (each conv/linear layer, its mode, and the rule that chose it).
    Calibration runs on random input here; on the data, a run may make a few more layers W1A32."""
    if recipe is not None:
        recipe = recipe_for(model, recipe, overrides)
        info = data_info(recipe.data)
        fp, policy = build_model(recipe, info, weights), recipe.binarize
        size, folder = (info.in_chans, info.image_size, info.image_size), out_dir(out, recipe)
    else:
        if overrides:
            raise IRConvertError("--set: needs --recipe (the overrides change a recipe's fields)")
        from .plan import Policy

        fp = create_model(model, weights=weights, pretrained=bool(weights))
        policy, size = Policy(), default_input_size(fp)
        folder = Path(out) if out else Path("runs") / str(model).replace("/", "_").replace(":", "_")
    with logged_warnings(log):
        student = binarize(fp, policy, inplace=True,
                           calibrate=torch.randn((2,) + tuple(size), generator=torch.Generator().manual_seed(0)))
    p = student.irconvert_plan
    layers = [{"layer": n, "type": type(fp.get_submodule(n)).__name__, "mode": lp.mode or "keep", "reason": lp.reason}
              for n, lp in p.layers.items()]
    say = result_log(log)
    if recipe is not None:
        say("# the recipe, resolved (extends merged, --set applied)")
        say(recipe.to_yaml().rstrip())
        say("")
    width = max([len(r["layer"]) for r in layers] + [5])
    say(f"{'layer':<{width}}  {'type':<16} {'mode':<6} why")
    for r in layers:
        say(f"{r['layer']:<{width}}  {r['type'][:16]:<16} {r['mode']:<6} {r['reason']}")
    say(f"{method_label(policy, p)}: {plan_counts(p)}; {len(p.hardtanh)} activations before W1A1 layers become "
        f"{'RPReLU' if p.rprelu else 'Hardtanh'}" + (f"; {len(p.shortcuts)} Bi-Real shortcuts" if p.shortcuts else ""))
    say(f"dry run: nothing written (a run would write to {folder}); input {tuple(size)}, calibrated on random input")
    return {"recipe": recipe.model_dump(mode="json") if recipe is not None else None, "out": str(folder),
            "input_size": list(size), "method_as_trained": method_label(policy, p), "layers": layers,
            "activations": list(p.hardtanh), "shortcuts": [list(s) for s in p.shortcuts]}


def evaluate_file(path: Union[str, os.PathLike], recipe: Union[Recipe, str, os.PathLike, None] = None,
                  overrides: tuple[str, ...] = (), runtime: bool = False, device: Optional[str] = None,
                  log=print) -> dict:
    """Return top-1, top-5 and loss of a packed file, a model.safetensors or a run folder (its packed file)
    on the recipe's validation data (a run folder's own recipe.yaml by default); `runtime` runs the
    W1A1 layers through the bitwise kernels."""
    path = Path(path)
    if path.is_dir():
        recipe = recipe if recipe is not None else path / "recipe.yaml"
        path = path / "packed.safetensors"
    if recipe is None:
        raise IRConvertError(f"{flag('recipe', label=True)}: {path} needs a recipe for its validation data "
                             "(e.g. the run's recipe.yaml)")
    recipe = resolve_recipe(recipe, overrides, {"train.device": device})
    net = _eval_model(path, runtime)
    info = data_info(recipe.data)
    want = (info.in_chans, info.image_size, info.image_size)
    if net.irconvert_input_size and tuple(net.irconvert_input_size) != want:
        raise IRConvertError(f"{path}: made for input {tuple(net.irconvert_input_size)}, but the recipe's data gives "
                             f"{want}; pass the recipe the model was trained with")
    dev = torch.device("cpu") if runtime else distributed.resolve_device(recipe.train.device)
    loader = build_data(recipe.data).loaders(recipe.data, torch.Generator(), recipe.train.seed)[1]
    log(f"evaluating {path} on {len(loader.dataset)} {recipe.data.dataset} validation images"
        f"{' through the bitwise kernels' if runtime else ''}")
    result = evaluate(net.to(dev), loader, dev, "off" if runtime else recipe.train.amp)
    result_log(log)(f"top-1 {result['top1']:.2f}%   top-5 {result['top5']:.2f}%   loss {result['loss']:.4f}")
    return result


def _eval_model(path: Path, runtime: bool) -> nn.Module:
    """Return the model in `path`: packed (float simulation or, with `runtime`, bitwise) or latent."""
    from .verify import load, load_packed

    if not path.is_file():
        raise IRConvertError(f"{path}: file not found; pass a packed.safetensors, a model.safetensors or a run folder")
    if _format(path).startswith("irconvert-latent"):
        if runtime:
            raise IRConvertError(f"{path}: {flag('runtime')} runs a packed file; pass packed.safetensors")
        return load(path)
    if runtime:
        from . import runtime as bitwise

        return bitwise.load(path)
    return load_packed(path)


def _format(path: Path) -> str:
    """Return the format a safetensors file's metadata names ('' if none or unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except Exception:  # load_packed reports what is wrong with the file
        return ""
