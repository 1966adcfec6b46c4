"""What each `irconvert` command does (cli.py holds only their options): one function per command,
called with the parsed options. The run modes are `run_one`, `batch` and `check`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .batch import model_dir, child_argv, read_model_list, run_batch, write_reports
from .errors import IRConvertError, logged_warnings
from .layer_summary import summary as layer_summary
from .models import create_model, split_name
from .plan import Policy
from .data import DataInfo, data_info
from .run import build_model, convert_only, convert_recipe, evaluate_file, recipe_for, run
from .runtime.bench import bench_packed
from .runfolder import export_run
from .swap import binarize
from .verify import verify_file


def run_one(model: str, recipe_path: Optional[str], **options) -> None:
    """`irconvert MODEL --recipe R`: one run (run.py)."""
    run(model, recipe_path, log=click.echo, **options)


def check(model: str, recipe_path: Optional[str], out: Optional[str], overrides: tuple[str, ...],
          overwrite: bool, weights: Optional[str]) -> None:
    """`irconvert MODEL --convert-only`: binarize, export, verify; with a recipe, its model and policy."""
    out = Path(out) if out else model_dir(Path("runs"), model)
    if recipe_path:
        convert_recipe(model, recipe_path, out, weights, overrides, overwrite, log=click.echo)
    else:
        if overrides:
            raise IRConvertError("--set: needs --recipe (the overrides change a recipe's fields)")
        convert_only(model, out, Policy(), weights=weights, overwrite=overwrite, log=click.echo)


def batch(models: tuple[str, ...], models_file: Optional[str], report_path: Optional[str],
          junit_path: Optional[str], timeout: Optional[float], **options) -> None:
    """`irconvert M1 M2 ... | --models FILE`: each model in its own process, JSON and JUnit reports."""
    names = [{"name": m, "set": []} for m in models] + (read_model_list(models_file) if models_file else [])
    if not names:
        raise IRConvertError("no model given: name one (e.g. resnet18) or pass --models FILE")
    out = Path(options.pop("out") or "runs/batch")
    report, junit = Path(report_path or out / "batch.json"), Path(junit_path or out / "junit.xml")
    for folder in {out, report.parent, junit.parent}:
        if (folder / "recipe.yaml").is_file():  # a batch's files never go into one run's folder
            raise IRConvertError(f"--out: {folder} holds a single run (recipe.yaml); give the batch its own folder")
    results = run_batch(names, out, child_argv(**options), timeout, log=click.echo)
    write_reports(results, report, junit)
    failed = [r["model"] for r in results if r["status"] != "ok"]
    click.echo(f"{len(results) - len(failed)}/{len(results)} converted; report {report}, junit {junit}")
    if failed:
        click.echo(f"irconvert: failed: {', '.join(failed)}", err=True)
        raise SystemExit(1)


def summary(model: str, weights: Optional[str], recipe_path: Optional[str], in_chans: Optional[int],
            mode: Optional[str], method: Optional[str], input_size: Optional[str], num_classes: Optional[int]) -> None:
    """`irconvert summary MODEL`: the per-layer table of MODEL binarized with the default policy (or the recipe's)."""
    size = parse_size(input_size)
    if recipe_path:
        recipe = recipe_for(model, recipe_path)
        info = data_info(recipe.data)
        info = DataInfo(num_classes or info.num_classes, in_chans or (size or [info.in_chans])[0], info.image_size)
        net, policy = build_model(recipe, info, weights), recipe.binarize
        size = size or (info.in_chans, info.image_size, info.image_size)
    else:
        net, policy = _summary_model(model, weights, in_chans or (size[0] if size else None), num_classes), Policy()
    try:
        policy = policy.model_copy(update={"mode": mode or policy.mode, "method": method or policy.method})
        policy = Policy.model_validate(policy.model_dump())
    except ValueError as exc:
        raise IRConvertError(f"--method: {exc.errors()[0]['msg']}") from None
    with logged_warnings(lambda line: click.echo(line, err=True)):
        b = binarize(net, policy, inplace=True)
    click.echo(str(layer_summary(b, size)))


def _summary_model(model: str, weights: Optional[str], in_chans: Optional[int], num_classes: Optional[int]):
    """Return MODEL with `in_chans` input channels (timm's argument, or the stem fix for torchvision)."""
    source, _ = split_name(model)
    kwargs = {"num_classes": num_classes} if num_classes else {}
    adapt = {}
    if in_chans and source == "timm":
        kwargs["in_chans"] = in_chans
    elif in_chans and in_chans != 3:
        adapt["in_chans"] = in_chans
    return create_model(model, weights=weights, adapt=adapt, **kwargs)


def export(path: str, out: Optional[str], recipe_path: Optional[str], overwrite: bool, fmt: str = "safetensors") -> None:
    """`irconvert export RUN|CHECKPOINT|model.safetensors [--out DIR]`; `--format tflite`: RUN|packed.safetensors."""
    if fmt == "tflite":
        from .tflite import export_tflite_file

        export_tflite_file(path, out, overwrite, log=click.echo)
        return
    export_run(path, out, recipe_path, overwrite=overwrite, log=click.echo)


def evaluate(path: str, recipe_path: Optional[str], overrides: tuple[str, ...], use_runtime: bool,
             device: Optional[str]) -> None:
    """`irconvert eval PATH [--recipe R] [--runtime]`: top-1 / top-5 on the recipe's validation data."""
    evaluate_file(path, recipe_path, overrides, use_runtime, device, log=click.echo)


def verify(packed: str, latent: Optional[str], tolerance: float, recipe_path: Optional[str] = None) -> None:
    """`irconvert verify packed.safetensors`: rebuild, compare with the latent model, sizes; exit 1 on a mismatch.
    `irconvert verify model.tflite [--recipe R]`: LCE's interpreter against the packed file beside it."""
    if packed.endswith(".tflite"):
        from .lce import verify_tflite_cli

        verify_tflite_cli(packed, recipe_path, log=click.echo)
        return
    if recipe_path:
        raise IRConvertError("--recipe: only for a model.tflite (a packed file is compared with its latent model)")
    r = verify_file(packed, latent)
    click.echo(str(r["summary"]))
    line = f"packed file: {r['packed_bytes'] / 2**20:.2f} MiB"
    if r["latent_bytes"]:
        line += f"   latent file: {r['latent_bytes'] / 2**20:.2f} MiB   ratio: {r['packed_bytes'] / r['latent_bytes']:.3f}"
    click.echo(line)
    if r["max_abs_diff"] is None:
        click.echo("no latent model at hand: rebuilt, outputs not compared")
        return
    ok = r["max_abs_diff"] <= tolerance
    click.echo(f"max |packed - latent| = {r['max_abs_diff']:.3g} ({'ok' if ok else 'MISMATCH'}, tolerance {tolerance:g})")
    if not ok:
        raise SystemExit(1)


def bench_runtime(packed: str, batches: tuple[int, ...], input_size: Optional[str], repeat: int,
                  json_path: Optional[str]) -> None:
    """`irconvert bench-runtime packed.safetensors`: bitwise runtime against fp32."""
    click.echo(bench_packed(packed, batches or (1, 8), parse_size(input_size), max(1, repeat), json_path))


def parse_size(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """Return (C, H, W) from 'C,H,W', or None for no text."""
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise IRConvertError(f"--input-size: {text!r} is not C,H,W (e.g. 3,224,224)")
    return size
