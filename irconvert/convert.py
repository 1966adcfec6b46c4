"""The whole job a recipe describes, as one call shared by the CLI and notebooks:

    load -> (fine-tune the FP teacher) -> binarize -> binary fine-tune with KD and EDE
         -> evaluate FP and binary -> export and verify -> write the run folder

The run folder holds recipe.yaml (resolved), metrics.jsonl, report.json, curves.png,
checkpoint.pt (last finished epoch, for --resume), model.safetensors and packed.safetensors.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from . import __version__, distributed
from .data import Data, build_data
from .errors import IRConvertError
from .models import create_model
from .recipe import Recipe, load_recipe
from .summary import summary
from .swap import binarize
from .train import Stage, evaluate, fit
from .verify import load_packed, max_abs_diff
from .write import atomic_path, save_latent, save_packed, write_text

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """Return the torch device for 'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise IRConvertError(f"train.device: {name!r} is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IRConvertError(f"train.device: {name} asked for, but no CUDA GPU is available; use cpu")
    return dev


def prepare_out_dir(out: Path, digest: str, resume: bool, overwrite: bool) -> Optional[dict]:
    """Check the output folder before anything is written; return the checkpoint to resume, if any."""
    if not out.exists() or not any(out.iterdir()):
        if resume:
            raise IRConvertError(f"--resume: {out} holds no run to resume; drop --resume to start one")
        return None
    if out.is_file():
        raise IRConvertError(f"output.dir: {out} is a file; choose a folder")
    recipe_file = out / "recipe.yaml"
    if not recipe_file.is_file():
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


def _write_metrics(out: Path, stages: list[Stage]) -> None:
    lines = [json.dumps(row) for st in stages for row in st.history]
    write_text(out / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))


def plot_curves(path: Path, stages: list[Stage]) -> None:
    """Write loss and accuracy per epoch of both stages to a PNG."""
    import matplotlib

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


def convert(
    model: Union[str, nn.Module, None],
    recipe: Union[Recipe, str, os.PathLike],
    out: Union[str, os.PathLike, None] = None,
    weights: Optional[str] = None,
    overrides: tuple[str, ...] = (),
    resume: bool = False,
    overwrite: bool = False,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    log=print,
) -> dict:
    """Run the recipe on `model` (a name, overriding the recipe's, or a module) and return the report."""
    extra = list(overrides)
    if isinstance(model, str):
        extra.append(f"model.name={model}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if device is not None:
        extra.append(f"train.device={device}")
    if isinstance(recipe, Recipe):
        from .recipe import apply_overrides, validate

        recipe = validate(apply_overrides(recipe.model_dump(mode="json"), extra)) if extra else recipe
    else:
        recipe = load_recipe(recipe, extra)
    if isinstance(model, str) and ":" in model:
        from .models import split_name

        source, name = split_name(model)
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": name, "source": source})})
    digest = recipe.digest()
    out = Path(out if out is not None else recipe.output.dir or Path("runs") / recipe.model.name.replace("/", "_"))
    dev = resolve_device(recipe.train.device)
    world = distributed.setup(recipe.train.backend, dev)
    if world.size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
    if not world.main:
        log = lambda *a, **k: None  # noqa: E731  (one process speaks)

    # everything that can be wrong with the input is found before the first file is written
    times: dict[str, float] = {}
    t = time.time()
    data = build_data(recipe.data)
    torch.manual_seed(recipe.train.seed)  # a random-init model is the same again on --resume
    fp = model if isinstance(model, nn.Module) else build_model(recipe, data, weights)
    times["load"] = time.time() - t
    state = prepare_out_dir(out, digest, resume, overwrite)
    distributed.barrier()  # every process has checked the folder before the first one writes to it
    if world.main:
        if overwrite and out.exists() and state is None:
            for name in ("checkpoint.pt", "metrics.jsonl", "report.json", "curves.png", "model.safetensors",
                         "packed.safetensors", "recipe.yaml"):
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", recipe.to_yaml())

    if recipe.train.sync_bn and world.size > 1:
        fp = nn.SyncBatchNorm.convert_sync_batchnorm(fp)
    fp = fp.to(dev)
    gen = torch.Generator()
    train_loader, val_loader = data.loaders(recipe.data, gen, recipe.train.seed, world.rank, world.size)
    teacher_stage = Stage("teacher", fp, recipe.teacher.finetune or recipe.train, recipe.train.seed,
                          amp=recipe.train.amp)
    stages = [teacher_stage]

    def checkpoint(stage: Stage, epoch: int, opt_state: dict) -> None:
        if not world.main:
            return
        if recipe.output.checkpoint:
            body = {"recipe_hash": digest, "stage": stage.name, "epoch": epoch, "model": stage.model.state_dict(),
                    "origin": json.dumps(getattr(fp, "irconvert_origin", None)),
                    "input_size": json.dumps([data.info.in_chans, data.info.image_size, data.info.image_size]),
                    "teacher": fp.state_dict(), "history": [r for st in stages for r in st.history], **opt_state}
            with atomic_path(out / CHECKPOINT) as tmp:
                torch.save(body, tmp)
        _write_metrics(out, stages)

    history = state["history"] if state else []
    teacher_stage.history = [r for r in history if r["stage"] == "teacher"]
    # --- teacher: fine-tune the full-precision model on this data (optional) ---
    t = time.time()
    if state is not None:
        fp.load_state_dict(state["teacher"])
    if recipe.teacher.finetune is not None:
        start, resume_opt = 0, None
        if state is not None:
            if state["stage"] == "teacher":
                start, resume_opt = state["epoch"], state
            else:
                start = recipe.teacher.finetune.epochs
        log(f"[1/4] fine-tuning the full-precision teacher ({recipe.teacher.finetune.epochs} epochs)")
        fit(teacher_stage, train_loader, val_loader, dev, start, resume_opt, checkpoint)
    times["teacher"] = time.time() - t

    # --- binarize ---
    t = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = binarize(fp, recipe.binarize, calibrate=calibration_batch(data))
    for w in caught:
        log(f"warning: {w.message}")
    times["binarize"] = time.time() - t
    teacher = None
    if recipe.train.distill.enabled:
        teacher = copy.deepcopy(fp).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    binary_stage = Stage("binary", student, recipe.train, recipe.train.seed, teacher=teacher,
                         distill=recipe.train.distill, ede=recipe.train.ede, amp=recipe.train.amp,
                         history=[r for r in history if r["stage"] == "binary"])
    stages.append(binary_stage)

    # --- binary fine-tune with distillation and the EDE schedule ---
    t = time.time()
    start, resume_opt = 0, None
    if state is not None and state["stage"] == "binary":
        student.load_state_dict(state["model"])
        start, resume_opt = state["epoch"], state
    log(f"[2/4] training the binary model ({recipe.train.epochs} epochs, {len(list(student.parameters()))} tensors)")
    fit(binary_stage, train_loader, val_loader, dev, start, resume_opt, checkpoint)
    times["train"] = time.time() - t

    # --- evaluate ---
    t = time.time()
    log("[3/4] evaluating")
    fp_acc = evaluate(fp, val_loader, dev, recipe.train.amp)
    bin_acc = evaluate(student, val_loader, dev, recipe.train.amp)
    times["evaluate"] = time.time() - t

    if not world.main:  # the main process writes the results; the others are done
        distributed.teardown()
        return {"model": recipe.model.name, "fp": fp_acc, "binary": bin_acc, "rank": world.rank}

    # --- export and verify ---
    t = time.time()
    files = {}
    student = student.cpu().eval()
    student.irconvert_input_size = (data.info.in_chans, data.info.image_size, data.info.image_size)
    verified = None
    if recipe.output.export:
        log("[4/4] exporting and verifying")
        files["model"] = str(save_latent(student, out / "model.safetensors", digest))
        files["packed"] = str(save_packed(student, out / "packed.safetensors", digest))
        x, _ = next(iter(val_loader))
        verified = max_abs_diff(student, load_packed(out / "packed.safetensors"), x[:16].cpu())
    times["export"] = time.time() - t

    size = summary(student, (data.info.in_chans, data.info.image_size, data.info.image_size))
    report = {
        "irconvert_version": __version__,
        "model": recipe.model.name,
        "source": recipe.model.source,
        "recipe_hash": digest,
        "mode": recipe.binarize.mode,
        "method": recipe.binarize.method,
        "fp": fp_acc,
        "binary": bin_acc,
        "packed_max_abs_diff": verified,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "size": {k: v for k, v in size.to_dict().items() if k != "rows"},
        "binary_layers": sum(r.binary != "fp32" for r in size.rows),
        "kept_layers": sum(r.binary == "fp32" for r in size.rows),
        "files": files,
    }
    write_text(out / "report.json", json.dumps(report, indent=2))
    if recipe.output.plot:
        plot_curves(out / "curves.png", stages)
    _write_metrics(out, stages)
    log(str(size))
    log(f"top-1: full precision {fp_acc['top1']:.2f}%   binary ({recipe.binarize.mode}) {bin_acc['top1']:.2f}%   "
        f"packed reload max |diff| {verified if verified is not None else 'n/a'}")
    log(f"wrote {out}")
    distributed.teardown()
    return report


def convert_only(
    model: Union[str, nn.Module],
    out: Union[str, os.PathLike],
    policy=None,
    weights: Optional[str] = None,
    input_size: Optional[tuple[int, ...]] = None,
    overwrite: bool = False,
    log=print,
    **kwargs,
) -> dict:
    """Binarize, export and verify without training: the check a CI job runs on a model list."""
    from .summary import default_input_size
    from .verify import load

    out = Path(out)
    t0 = time.time()
    fp = model if isinstance(model, nn.Module) else create_model(model, weights=weights, pretrained=bool(weights), **kwargs)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise IRConvertError(f"output.dir: {out} is not empty; pass --overwrite or another --out")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        student = binarize(fp, policy).eval()
    for w in caught:
        log(f"warning: {w.message}")
    size_in = tuple(input_size or default_input_size(student))
    student.irconvert_input_size = size_in
    files = {"model": str(save_latent(student, out / "model.safetensors")),
             "packed": str(save_packed(student, out / "packed.safetensors"))}
    x = torch.randn((2,) + size_in, generator=torch.Generator().manual_seed(0))
    diff = max(max_abs_diff(student, load_packed(out / "packed.safetensors"), x),
               max_abs_diff(student, load(out / "model.safetensors"), x))
    size = summary(student, size_in)
    report = {
        "irconvert_version": __version__,
        "model": model if isinstance(model, str) else type(model).__name__,
        "mode": student.irconvert_plan.policy.mode,
        "method": student.irconvert_plan.policy.method,
        "packed_max_abs_diff": diff,
        "size": {k: v for k, v in size.to_dict().items() if k != "rows"},
        "file_bytes": {k: os.path.getsize(v) for k, v in files.items()},
        "binary_layers": sum(r.binary != "fp32" for r in size.rows),
        "kept_layers": sum(r.binary == "fp32" for r in size.rows),
        "seconds": {"total": round(time.time() - t0, 2)},
        "files": files,
    }
    write_text(out / "report.json", json.dumps(report, indent=2))
    log(f"{report['model']}: {report['binary_layers']} binary / {report['kept_layers']} kept layers, packed "
        f"{report['file_bytes']['packed'] / 2**20:.2f} MiB vs {report['file_bytes']['model'] / 2**20:.2f} MiB, "
        f"reload max |diff| {diff:.3g}")
    return report


def calibration_batch(data: Data, n: int = 64) -> torch.Tensor:
    """Return the first n training images, the same on every run, resume and export (augmentation seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        items = [data.train[i] for i in range(min(n, len(data.train)))]
        return (data.val_collate or torch.utils.data.default_collate)(items)[0]


def export_run(path: Union[str, os.PathLike], overwrite: bool = False, log=print) -> dict[str, str]:
    """Write model.safetensors and packed.safetensors from a run folder (its checkpoint) or a model.safetensors."""
    from .verify import load

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        student, out, digest = load(path), path.parent, None
        targets = {"packed": out / "packed.safetensors"}
    else:
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
        fp = create_model(origin["name"], origin["source"], adapt=origin.get("adapt"), **origin.get("kwargs", {}))
        # binarize the same FP weights the run binarized: the per-layer gains come from them
        fp.load_state_dict(state["teacher"])
        student = binarize(fp, recipe.binarize, calibrate=calibration_batch(build_data(recipe.data)))
        student.load_state_dict(state["model"])
        student.irconvert_input_size = tuple(json.loads(state.get("input_size") or "[]")) or None
        out, digest = run, state["recipe_hash"]
        targets = {"model": out / "model.safetensors", "packed": out / "packed.safetensors"}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise IRConvertError(f"export: {', '.join(existing)} already exist; pass --overwrite to replace them")
    student = student.cpu().eval()
    written = {}
    if "model" in targets:
        written["model"] = str(save_latent(student, targets["model"], digest))
    written["packed"] = str(save_packed(student, targets["packed"], digest))
    for k, v in written.items():
        log(f"wrote {v}")
    return written
