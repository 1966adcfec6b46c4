"""What each `irconvert` command does (cli.py holds only their options): one function per command,
called with the parsed options. The run modes are `run_one`, `batch` and `check`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .batch import check_entries, model_dir, child_argv, read_model_list, run_batch, write_reports
from .errors import IRConvertError, logged_warnings
from .layer_summary import summary as layer_summary
from .models import create_model, split_name
from .plan import Policy
from .data import DataInfo, data_info
from .recipe import policy_from_sets
from .run import build_model, convert_only, convert_recipe, dry_run, evaluate_file, recipe_for, run
from .runtime.bench import bench_packed
from .runfolder import export_run
from .swap import binarize
from .verify import verify_file


class Console:
    """Where a command's lines go: progress and warnings (`console(line)`) to stderr, results
    (`console.result(line)`: tables, figures, files written) to stdout, so that `> file` or a pipe gets the
    results and the terminal still shows the rest."""

    def __call__(self, line: str = "") -> None:
        click.echo(line, err=True)

    def result(self, line: str = "") -> None:
        click.echo(line)


console = Console()


def run_one(model: str, recipe_path: Optional[str], dry_run: bool = False, **options) -> dict:
    """`irconvert MODEL --recipe R`: one run (run.py); with `dry_run`, what it would do."""
    if dry_run:
        return plan_only(model, recipe_path, options["out"], options["weights"], options["overrides"])
    return run(model, recipe_path, log=console, **options)


def plan_only(model: str, recipe_path: Optional[str], out: Optional[str], weights: Optional[str],
              overrides: tuple[str, ...]) -> dict:
    """`--dry-run`: the resolved recipe and the conversion plan; nothing written."""
    return dry_run(model, recipe_path, out, weights, overrides, log=console)


def check(model: str, recipe_path: Optional[str], out: Optional[str], overrides: tuple[str, ...],
          overwrite: bool, weights: Optional[str], dry_run: bool = False) -> dict:
    """`irconvert MODEL --convert-only`: binarize, export, verify; with a recipe, its model and policy."""
    if dry_run:
        return plan_only(model, recipe_path, out, weights, overrides)
    out = Path(out) if out else model_dir(Path("runs"), model)
    if recipe_path:
        return convert_recipe(model, recipe_path, out, weights, overrides, overwrite, log=console)
    return convert_only(model, out, policy_from_sets(list(overrides)), weights=weights, overwrite=overwrite,
                        log=console)


def batch(models: tuple[str, ...], models_file: Optional[str], report_path: Optional[str],
          junit_path: Optional[str], timeout: Optional[float], **options) -> None:
    """`irconvert M1 M2 ... | --models FILE`: each model in its own process, JSON and JUnit reports."""
    names = [{"name": m, "set": []} for m in models] + (read_model_list(models_file) if models_file else [])
    if not names:
        raise IRConvertError("no model given: name one (e.g. resnet18) or pass --models FILE")
    check_entries(names, models_file, options["recipe_path"], options["overrides"])
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
            mode: Optional[str], method: Optional[str], input_size: Optional[str], num_classes: Optional[int]) -> dict:
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
    with logged_warnings(console):
        b = binarize(net, policy, inplace=True)
    table = layer_summary(b, size)
    click.echo(str(table))
    return table.to_dict()


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


def export(path: str, out: Optional[str], recipe_path: Optional[str], overwrite: bool, fmt: str = "safetensors") -> dict:
    """`irconvert export RUN|CHECKPOINT|model.safetensors [--out DIR]`; `--format tflite`: RUN|packed.safetensors."""
    if fmt == "tflite":
        from .tflite import export_tflite_file

        export_tflite_file(path, out, overwrite, log=console)
        return {}
    return export_run(path, out, recipe_path, overwrite=overwrite, log=console)


def evaluate(path: str, recipe_path: Optional[str], overrides: tuple[str, ...], use_runtime: bool,
             device: Optional[str]) -> dict:
    """`irconvert eval PATH [--recipe R] [--runtime]`: top-1 / top-5 on the recipe's validation data."""
    return evaluate_file(path, recipe_path, overrides, use_runtime, device, log=console)


def verify(packed: str, latent: Optional[str], tolerance: float, recipe_path: Optional[str] = None) -> dict:
    """`irconvert verify packed.safetensors|RUN`: rebuild, compare with the latent model, sizes; the result's
    'ok' is False on a mismatch (the CLI's exit code 1). `irconvert verify model.tflite [--recipe R]`: LCE's
    interpreter against the packed file beside it (exit 1 on a mismatch)."""
    if packed.endswith(".tflite"):
        from .lce import verify_tflite_cli

        return verify_tflite_cli(packed, recipe_path, log=console)
    if recipe_path:
        raise IRConvertError("--recipe: only for a model.tflite (a packed file is compared with its latent model)")
    r = verify_file(packed, latent)
    result = {"packed": r["packed"], "latent": r["latent"], "packed_bytes": r["packed_bytes"],
              "latent_bytes": r["latent_bytes"], "max_abs_diff": r["max_abs_diff"], "tolerance": tolerance,
              "ok": None if r["max_abs_diff"] is None else r["max_abs_diff"] <= tolerance,
              "size": {k: v for k, v in r["summary"].to_dict().items() if k != "rows"}}
    click.echo(str(r["summary"]))
    line = f"packed file: {r['packed_bytes'] / 2**20:.2f} MiB"
    if r["latent_bytes"]:
        line += f"   latent file: {r['latent_bytes'] / 2**20:.2f} MiB   ratio: {r['packed_bytes'] / r['latent_bytes']:.3f}"
    click.echo(line)
    if r["max_abs_diff"] is None:
        click.echo("no latent model at hand: rebuilt, outputs not compared")
        return result
    click.echo(f"max |packed - latent| = {r['max_abs_diff']:.3g} ({'ok' if result['ok'] else 'MISMATCH'}, "
               f"tolerance {tolerance:g})")
    return result


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


def list_models(pattern: Optional[str], source: Optional[str], verified: bool) -> list[dict]:
    """`irconvert list-models [PATTERN]`: model names, with what the zoo sweep verified."""
    from .models import list_models as find

    rows = find(pattern or "", source, verified)
    width = max([len(r["name"]) for r in rows] + [10])
    for r in rows:
        z = r["zoo"]
        if z is None:
            click.echo(r["name"])
        elif z["status"] == "ok":
            click.echo(f"{r['name']:<{width}}  zoo: ok, {100 * z['binary_mac_share']:.1f}% of MACs binary, packed "
                       f"{100 * z['size_ratio']:.1f}% of fp32")
        else:
            click.echo(f"{r['name']:<{width}}  zoo: fail ({z['reason']})")
    ok = sum(1 for r in rows if r["zoo"] and r["zoo"]["status"] == "ok")
    console(f"{len(rows)} models; {ok} verified in the zoo sweep (binarized, trained 20 steps, exported and "
            f"rebuilt exactly), {sum(1 for r in rows if r['zoo']) - ok} failed it, the rest not in it")
    return rows
