"""The `irconvert` command line: `irconvert MODEL... --recipe R` converts; subcommands do the rest.

Every error a user can cause is an IRConvertError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
import warnings

import click

from .errors import IRConvertError
from .methods import METHODS


class _DefaultGroup(click.Group):
    """A group whose unknown first word is a model name for the `convert` command."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="irconvert")
def cli():
    """Convert pretrained timm / torchvision models into IR-Net binary networks.

    \b
    irconvert resnet34 --recipe recipes/imagenet.yaml     convert (load, binarize, fine-tune, export)
    irconvert summary resnet18                           per-layer table of the binarized model
    """


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 3 or min(size) <= 0:
        raise IRConvertError(f"--input-size: {text!r} is not C,H,W (e.g. 3,224,224)")
    return size


@cli.command("summary")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights (.safetensors or .pth).")
@click.option("--mode", type=click.Choice(["W1A1", "W1A32"]), default="W1A1", show_default=True)
@click.option("--method", default="irnet", show_default=True,
              help=f"Binarization method: {', '.join(METHODS)}.")
@click.option("--input-size", help="C,H,W used to count MACs (default: the model's own).")
@click.option("--num-classes", type=int, help="Classifier size (default: the model's own).")
def summary_cmd(model, weights, mode, method, input_size, num_classes):
    """Print the per-layer summary of MODEL binarized with the default policy."""
    from . import binarize, summary
    from .models import create_model
    from .plan import Policy

    kwargs = {"num_classes": num_classes} if num_classes else {}
    try:
        policy = Policy(mode=mode, method=method)
    except ValueError as exc:
        raise IRConvertError(f"--method: {exc.errors()[0]['msg']}") from None
    net = create_model(model, weights=weights, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = binarize(net, policy, inplace=True)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    click.echo(str(summary(b, _parse_size(input_size))))


@cli.command("convert")
@click.argument("models", nargs=-1)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="Recipe YAML (see recipes/).")
@click.option("--models", "models_file", type=click.Path(dir_okay=False),
              help="YAML list of models (names, or {name, set: [key=value]}) to convert one after another.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local pretrained weights (.safetensors or .pth).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (batch: one sub-folder per model).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. train.epochs=2.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@click.option("--seed", type=int, help="Seed (train.seed).")
@click.option("--device", help="auto, cpu, cuda, cuda:N (train.device).")
@click.option("--convert-only", is_flag=True, help="No training: binarize, export and verify the exact reload.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Batch: JSON report (default OUT/batch.json).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Batch: JUnit XML (default OUT/junit.xml).")
@click.option("--timeout", type=float, help="Batch: seconds allowed per model.")
def convert_cmd(models, recipe_path, models_file, weights, out, overrides, resume, overwrite, seed, device,
                convert_only, report_path, junit_path, timeout):
    """Convert MODEL... with a recipe: load, fine-tune, binarize, distill, evaluate, export.

    Several models (or --models FILE) run one after another, each in its own process, with a JSON
    and a JUnit report; the exit code is 0 only if all of them succeeded.
    """
    from pathlib import Path

    if not recipe_path and not convert_only:
        raise IRConvertError("--recipe: a recipe is needed (see recipes/), or --convert-only to skip training")
    names = [{"name": m, "set": []} for m in models]
    if models_file:
        from .batch import read_model_list

        names += read_model_list(models_file)
    if not names:
        raise IRConvertError("no model given: name one (e.g. resnet18) or pass --models FILE")
    if recipe_path and not Path(recipe_path).is_file():
        raise IRConvertError(f"{recipe_path}: recipe not found; pass an existing YAML file (see recipes/)")
    if len(names) > 1 or models_file:
        _batch(names, recipe_path, weights, out, overrides, resume, overwrite, seed, device, convert_only,
               report_path, junit_path, timeout)
        return
    name, extra = names[0]["name"], tuple(overrides) + tuple(names[0]["set"])
    if convert_only:
        _convert_only(name, recipe_path, weights, out, extra, overwrite)
        return
    from .convert import convert

    convert(name, recipe_path, out=out, weights=weights, overrides=extra, resume=resume,
            overwrite=overwrite, seed=seed, device=device, log=click.echo)


def _convert_only(name, recipe_path, weights, out, overrides, overwrite):
    from pathlib import Path

    from .convert import convert_only
    from .plan import Policy

    policy, kwargs = Policy(), {}
    if recipe_path:
        from .recipe import load_recipe

        recipe = load_recipe(recipe_path, list(overrides))
        policy, kwargs = recipe.binarize, dict(recipe.model.kwargs)
    out = Path(out or Path("runs") / name.replace(":", "_").replace("/", "_"))
    convert_only(name, out, policy, weights=weights, overwrite=overwrite, log=click.echo, **kwargs)


def _batch(names, recipe_path, weights, out, overrides, resume, overwrite, seed, device, convert_only,
           report_path, junit_path, timeout):
    from pathlib import Path

    from .batch import run_batch, write_reports

    if weights:
        raise IRConvertError("--weights names one model's file: set model.pretrained per model in --models instead")
    out = Path(out or "runs/batch")
    common = []
    if recipe_path:
        common += ["--recipe", str(recipe_path)]
    for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--convert-only", convert_only)):
        if on:
            common.append(flag)
    for flag, value in (("--seed", seed), ("--device", device)):
        if value is not None:
            common += [flag, str(value)]
    for s in overrides:
        common += ["--set", s]
    results = run_batch(names, out, common, timeout, log=click.echo)
    report = Path(report_path or out / "batch.json")
    junit = Path(junit_path or out / "junit.xml")
    write_reports(results, report, junit)
    failed = [r["model"] for r in results if r["status"] != "ok"]
    click.echo(f"{len(results) - len(failed)}/{len(results)} converted; report {report}, junit {junit}")
    if failed:
        click.echo(f"irconvert: failed: {', '.join(failed)}", err=True)
        raise SystemExit(1)


@cli.command("export")
@click.argument("path", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace model/packed files already there.")
def export_cmd(path, overwrite):
    """Write model.safetensors and packed.safetensors from a run folder, checkpoint or model.safetensors."""
    from .convert import export_run

    export_run(path, overwrite=overwrite, log=click.echo)


@cli.command("verify")
@click.argument("packed", type=click.Path())
@click.option("--latent", type=click.Path(dir_okay=False), help="model.safetensors to compare with (default: beside PACKED).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True)
def verify_cmd(packed, latent, tolerance):
    """Rebuild PACKED, check its outputs against the latent model, print summary and sizes."""
    from .verify import verify_file

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


@cli.command("bench-runtime")
@click.argument("packed", type=click.Path())
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size, repeatable (default: 1 and 8).")
@click.option("--input-size", help="C,H,W of the input (default 3,224,224).")
@click.option("--repeat", type=int, default=10, show_default=True, help="Timed runs per batch size.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows as JSON here.")
def bench_runtime_cmd(packed, batches, input_size, repeat, json_path):
    """Time PACKED run by the bitwise runtime against its fp32 model (median ms, full-precision share)."""
    from .runtime.bench import bench_packed

    size = _parse_size(input_size) or (3, 224, 224)
    click.echo(bench_packed(packed, batches or (1, 8), size, max(1, repeat), json_path))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors become one line on stderr and exit code 2."""
    try:
        cli.main(args=argv, prog_name="irconvert", standalone_mode=False)
    except IRConvertError as exc:
        click.echo(f"irconvert: error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("irconvert: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"irconvert: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SystemExit:
        raise


if __name__ == "__main__":
    main()
