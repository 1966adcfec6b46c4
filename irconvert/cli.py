"""The `irconvert` command line, thin: options and help only, so that `--help` and usage errors
answer without importing torch. The work is in `commands.py`, imported when a command runs.

    irconvert MODEL --recipe R ...              one run            (command `run`)
    irconvert M1 M2 ... | --models FILE ...     a batch            (command `batch`)
    irconvert MODEL... --convert-only           binarize, export, verify; no training (command `check`)

Every error a user can cause is an IRConvertError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import click

from .errors import IRConvertError

# options of the run modes that take a value (the rest are flags): the router skips their values
_VALUED = {"--recipe", "--models", "--weights", "--out", "--set", "--seed", "--device", "--report", "--junit",
           "--timeout"}


def _mode(args: list[str]) -> str:
    """Return the command a bare `irconvert MODEL... [options]` line means: check, batch or run."""
    models, skip = 0, False
    for a in args:
        if skip:
            skip = False
        elif a.startswith("-"):
            skip = a in _VALUED
        else:
            models += 1
    if models > 1 or "--models" in args:
        return "batch"
    return "check" if "--convert-only" in args else "run"


class _DefaultGroup(click.Group):
    """A group whose unknown first word is a model name: the line goes to `run`, `batch` or `check`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [_mode(args), *args]
        return super().parse_args(ctx, args)


def _need_recipe(recipe_path: Optional[str]) -> None:
    """Refuse a training run without an existing recipe file, before anything heavy is imported."""
    if not recipe_path:
        raise IRConvertError("--recipe: a recipe is needed (see recipes/), or --convert-only to skip training")
    if not Path(recipe_path).is_file():
        raise IRConvertError(f"{recipe_path}: recipe not found; pass an existing YAML file (see recipes/)")


def _do(command: str, **options) -> None:
    """Run commands.<command>(**options): the one place the heavy modules are imported."""
    getattr(importlib.import_module(".commands", __package__), command)(**options)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="irconvert")
def cli():
    """Convert pretrained timm / torchvision models into IR-Net binary networks.

    \b
    irconvert resnet34 --recipe recipes/imagenet.yaml     one run (load, binarize, fine-tune, export)
    irconvert resnet18 mobilenetv3_small_100 --recipe R   a batch, each model in its own process
    irconvert --models list.yaml --convert-only           binarize, export, verify; no training
    irconvert summary resnet18                            per-layer table of the binarized model
    """


def _recipe_options(f):
    """The options every run mode shares."""
    for opt in reversed([
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="Recipe YAML (see recipes/)."),
        click.option("--out", type=click.Path(file_okay=False), help="Run folder (batch: one sub-folder per model)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe field, e.g. train.epochs=2."),
        click.option("--overwrite", is_flag=True, help="Replace the run already in --out."),
    ]):
        f = opt(f)
    return f


def _train_options(f):
    """The options of the modes that train."""
    for opt in reversed([
        click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
        click.option("--seed", type=int, help="Seed (train.seed)."),
        click.option("--device", help="auto, cpu, cuda, cuda:N (train.device)."),
    ]):
        f = opt(f)
    return f


@cli.command("run")
@click.argument("model")
@_recipe_options
@_train_options
@click.option("--weights", type=click.Path(dir_okay=False), help="Local pretrained weights (.safetensors or .pth).")
def run_cmd(**options):
    """Convert MODEL with a recipe: load, fine-tune, binarize, distill, evaluate, export."""
    _need_recipe(options["recipe_path"])
    _do("run_one", **options)


@cli.command("batch")
@click.argument("models", nargs=-1)
@click.option("--models", "models_file", type=click.Path(dir_okay=False),
              help="YAML list of models (names, or {name, set: [key=value]}) to convert one after another.")
@_recipe_options
@_train_options
@click.option("--convert-only", is_flag=True, help="No training: binarize, export and verify the exact reload.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="JSON report (default OUT/batch.json).")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="JUnit XML (default OUT/junit.xml).")
@click.option("--timeout", type=float, help="Seconds allowed per model.")
def batch_cmd(**options):
    """Convert MODEL... (or --models FILE) one after another, each in its own process, with a JSON and
    a JUnit report; the exit code is 0 only if all of them succeeded."""
    if not options["convert_only"]:
        _need_recipe(options["recipe_path"])
    _do("batch", **options)


@cli.command("check")
@click.argument("model")
@_recipe_options
@click.option("--weights", type=click.Path(dir_okay=False), help="Local pretrained weights (.safetensors or .pth).")
@click.option("--convert-only", is_flag=True, hidden=True, help="The flag that chooses this command.")
def check_cmd(convert_only, **options):
    """Binarize MODEL (the recipe's policy, or the default), export it and verify the exact reload; no training."""
    _do("check", **options)


@cli.command("summary")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights (.safetensors or .pth).")
@click.option("--mode", type=click.Choice(["W1A1", "W1A32"]), default="W1A1", show_default=True)
@click.option("--method", default="irnet", show_default=True,
              help="Binarization method: a registered name (irnet, vanilla, libra, ede, sdbnn, sdbnn_ede, irnet_sd, "
                   "scaled, irnet_scaled) or module:Class.")
@click.option("--input-size", help="C,H,W used to count MACs (default: the model's own).")
@click.option("--num-classes", type=int, help="Classifier size (default: the model's own).")
def summary_cmd(**options):
    """Print the per-layer summary of MODEL binarized with the default policy."""
    _do("summary", **options)


@cli.command("export")
@click.argument("path", type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace model/packed files already there.")
def export_cmd(**options):
    """Write model.safetensors and packed.safetensors from a run folder, checkpoint or model.safetensors."""
    _do("export", **options)


@cli.command("verify")
@click.argument("packed", type=click.Path())
@click.option("--latent", type=click.Path(dir_okay=False), help="model.safetensors to compare with (default: beside PACKED).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True)
def verify_cmd(**options):
    """Rebuild PACKED, check its outputs against the latent model, print summary and sizes."""
    _do("verify", **options)


@cli.command("bench-runtime")
@click.argument("packed", type=click.Path())
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size, repeatable (default: 1 and 8).")
@click.option("--input-size", help="C,H,W of the input (default 3,224,224).")
@click.option("--repeat", type=int, default=10, show_default=True, help="Timed runs per batch size.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows as JSON here.")
def bench_runtime_cmd(**options):
    """Time PACKED run by the bitwise runtime against its fp32 model (median ms, full-precision share)."""
    _do("bench_runtime", **options)


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


if __name__ == "__main__":
    main()
