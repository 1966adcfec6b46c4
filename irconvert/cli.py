"""The `irconvert` command line, thin: options and help only, so that `--help` and usage errors
answer without importing torch. The work is in `commands.py`, imported when a command runs.

    irconvert MODEL --recipe R ...              one run            (command `run`)
    irconvert M1 M2 ... | --models FILE ...     a batch            (command `batch`)
    irconvert MODEL... --convert-only           binarize, export, verify; no training (command `check`)

Every error a user can cause is an IRConvertError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Optional

import click

from . import shipped
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
        _check_sets(args)
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [_mode(args), *args]
        return super().parse_args(ctx, args)


def _check_sets(args: list[str]) -> None:
    """Refuse `--set key value` (a space for '='), before the bare value is taken for a model name."""
    for i, a in enumerate(args):
        value = args[i + 1] if a == "--set" and i + 1 < len(args) else (a[6:] if a.startswith("--set=") else None)
        if value is None or "=" in value:
            continue
        j = i + 2 if a == "--set" else i + 1
        after = args[j] if j < len(args) else None
        hint = f"--set {value}={after}" if after and not after.startswith("-") else f"--set {value}=VALUE"
        raise IRConvertError(f"--set {value!r}: expected key.path=value; did you mean {hint}?")


def _need_recipe(recipe_path: Optional[str]) -> None:
    """Refuse a training run without an existing recipe file, before anything heavy is imported."""
    if not recipe_path:
        raise IRConvertError("--recipe: a recipe is needed (a YAML file, or a shipped one's name: irconvert "
                             "list-recipes), or --convert-only to skip training")
    shipped.find(recipe_path)


def _one_of_resume_overwrite(options: dict) -> None:
    """Refuse --resume with --overwrite (continue a run, or replace it: not both)."""
    if options.get("resume") and options.get("overwrite"):
        raise IRConvertError("--resume and --overwrite: pass one of them (continue the run, or replace it)")


def _do(command: str, quiet: bool = False, as_json: bool = False, **options):
    """Run commands.<command>(**options), the one place the heavy modules are imported, and return what it
    returns. The rule of every command: stdout carries what the command produces (tables, figures, the files
    written), stderr its progress and warnings, and errors. `quiet` drops both (errors still reach stderr);
    `as_json` prints the command's result as one JSON object on stdout instead, its lines going to stderr."""
    real_out = sys.stdout
    with contextlib.ExitStack() as stack:
        if quiet:
            null = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(null))
            stack.enter_context(contextlib.redirect_stderr(null))
        elif as_json:  # nothing but the JSON object reaches stdout, whatever a library prints
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        result = getattr(importlib.import_module(".commands", __package__), command)(**options)
    if as_json:
        real_out.write(json.dumps(result, indent=2, default=str) + "\n")
        real_out.flush()
    return result


def _script_options(f):
    """--quiet and --json, for scripts."""
    for opt in reversed([
        click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors (the exit code tells the rest)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the result (e.g. the report) as one JSON object on stdout; progress goes to stderr."),
    ]):
        f = opt(f)
    return f


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="irconvert")
def cli():
    """Convert pretrained timm / torchvision models into IR-Net binary networks.

    \b
    irconvert resnet34 --recipe recipes/imagenet.yaml     one run (load, binarize, fine-tune, export)
    irconvert resnet18 mobilenetv3_small_100 --recipe R   a batch, each model in its own process
    irconvert --models list.yaml --convert-only           binarize, export, verify; no training
    irconvert summary resnet18                            per-layer table of the binarized model
    irconvert list-models 'resnet*'                       model names, with what the zoo sweep verified

    Results go to stdout, progress and warnings to stderr; --quiet and --json are for scripts.
    """


def _recipe_options(f):
    """The options every run mode shares."""
    for opt in reversed([
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), help="Recipe YAML, or a shipped recipe's name (irconvert list-recipes)."),
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
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and the conversion plan (each layer's mode and why); write nothing.")
@_script_options
def run_cmd(**options):
    """Convert MODEL with a recipe: load, fine-tune, binarize, distill, evaluate, export."""
    _need_recipe(options["recipe_path"])
    _one_of_resume_overwrite(options)
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
    _one_of_resume_overwrite(options)
    _do("batch", **options)


@cli.command("check")
@click.argument("model")
@_recipe_options
@click.option("--weights", type=click.Path(dir_okay=False), help="Local pretrained weights (.safetensors or .pth).")
@click.option("--convert-only", is_flag=True, hidden=True, help="The flag that chooses this command.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and the conversion plan (each layer's mode and why); write nothing.")
@_script_options
def check_cmd(convert_only, **options):
    """Binarize MODEL (the recipe's policy, or the default), export it and verify the exact reload; no training."""
    _do("check", **options)


@cli.command("summary")
@click.argument("model")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local weights (.safetensors or .pth).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="Build the model as this recipe does (model section, the data's classes, channels, image "
                   "size, stem fixes, policy).")
@click.option("--in-chans", type=int, help="Input channels of the stem (default: the model's own, or --input-size's C).")
@click.option("--mode", type=click.Choice(["W1A1", "W1A32"]), help="Binary mode (default W1A1, or the recipe's).")
@click.option("--method",
              help="Binarization method (default irnet, or the recipe's): a registered name (irnet, vanilla, libra, ede, sdbnn, sdbnn_ede, irnet_sd, "
                   "scaled, irnet_scaled) or module:Class.")
@click.option("--input-size", help="C,H,W used to count MACs (default: the model's own, or the recipe's data).")
@click.option("--num-classes", type=int, help="Classifier size (default: the model's own).")
@_script_options
def summary_cmd(**options):
    """Print the per-layer summary of MODEL binarized with the default policy."""
    _do("summary", **options)


@cli.command("export")
@click.argument("path", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), help="Folder to write to (default: beside PATH).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="The run's recipe, for a checkpoint.pt written before checkpoints held it.")
@click.option("--overwrite", is_flag=True, help="Replace model/packed files that differ from what export writes.")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "tflite"]), default="safetensors", show_default=True,
              help="tflite: model.tflite for Larq Compute Engine from a run folder's or the given packed.safetensors.")
@_script_options
def export_cmd(**options):
    """Write model.safetensors and packed.safetensors from a run folder, checkpoint or model.safetensors
    (--format tflite: model.tflite for Larq Compute Engine). Files already there with the same contents are
    left as they are."""
    _do("export", **options)


@cli.command("eval")
@click.argument("path", type=click.Path())
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="Recipe whose validation data to use (default: a run folder's recipe.yaml).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. data.val_subset=1000.")
@click.option("--runtime", "use_runtime", is_flag=True, help="Run the W1A1 layers through the bitwise kernels (packed files).")
@click.option("--device", help="auto, cpu, cuda, cuda:N (default: the recipe's).")
@_script_options
def eval_cmd(**options):
    """Top-1 / top-5 of PATH (packed.safetensors, model.safetensors or a run folder) on the recipe's validation data."""
    _do("evaluate", **options)


@cli.command("verify")
@click.argument("packed", type=click.Path())
@click.option("--latent", type=click.Path(dir_okay=False), help="model.safetensors to compare with (default: beside PACKED).")
@click.option("--tolerance", type=float, default=1e-5, show_default=True,
              help="Largest max |packed - latent| output difference that passes (exit code 1 above it).")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False),
              help="model.tflite: also compare top-1 on this recipe's validation data.")
@_script_options
def verify_cmd(**options):
    """Rebuild PACKED (a packed.safetensors or a run folder), check its outputs against the latent model,
    print summary and sizes. A model.tflite runs in Larq Compute Engine's interpreter (all three kernels)
    against the packed.safetensors beside it."""
    if _do("verify", **options).get("ok") is False:
        raise SystemExit(1)


@cli.command("bench-runtime")
@click.argument("packed", type=click.Path())
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size, repeatable (default: 1 and 8).")
@click.option("--input-size", help="C,H,W of the input (default: the size stored in the file, else the model's own).")
@click.option("--repeat", type=int, default=10, show_default=True, help="Timed runs per batch size.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the rows as JSON here.")
def bench_runtime_cmd(**options):
    """Time PACKED (a packed.safetensors or a run folder) run by the bitwise runtime against its fp32 model
    (median ms, full-precision share)."""
    _do("bench_runtime", **options)


@cli.command("list-recipes")
def list_recipes_cmd():
    """List the recipes shipped with irconvert: pass one with --recipe NAME from any folder."""
    width = max(map(len, shipped.names()))
    for name in shipped.names():
        click.echo(f"{name:<{width}}  {shipped.describe(name)}")
    click.echo(f"(in {shipped.FOLDER}; e.g. irconvert resnet18 --recipe quickstart)")


@cli.command("list-models")
@click.argument("pattern", required=False)
@click.option("--source", type=click.Choice(["timm", "torchvision"]), help="Only this library's models.")
@click.option("--verified", is_flag=True, help="Only the models the zoo sweep checked (ok or failed).")
@_script_options
def list_models_cmd(**options):
    """List the model names irconvert loads (timm's, and torchvision's as torchvision:NAME) matching PATTERN
    (wildcards as in timm.list_models: 'resnet*', '*vit*'), with what the model-zoo sweep verified."""
    _do("list_models", **options)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: user errors become one line on stderr and exit code 2; Ctrl-C says how to resume
    (exit 130); any other error is a bug: one line and the path of a log with its traceback (exit 1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=argv, prog_name="irconvert", standalone_mode=False)
    except IRConvertError as exc:
        click.echo(f"irconvert: error: {' '.join(exc.cli().split())}", err=True)
        sys.exit(2)
    except click.exceptions.Abort as exc:
        # click turns both Ctrl-C and an EOFError raised anywhere inside into Abort
        if isinstance(exc.__context__, KeyboardInterrupt) or exc.__context__ is None:
            click.echo(f"irconvert: interrupted{_resume_hint(argv)}", err=True)
            sys.exit(130)
        _internal_error(exc.__context__)
    except click.ClickException as exc:
        click.echo(f"irconvert: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"irconvert: interrupted{_resume_hint(argv)}", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: the user gets one line, the traceback goes to a file
        _internal_error(exc)


def _resume_hint(argv: list[str]) -> str:
    """Return '; continue with: irconvert ... --resume' for a training line, else ''."""
    if not argv or argv[0] in cli.commands and argv[0] not in ("run", "batch") or "--convert-only" in argv:
        return ""
    if argv[0] not in cli.commands and _mode(argv) == "check":
        return ""
    line = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    return f"; continue with: irconvert {shlex.join(line)}"


def _internal_error(exc: BaseException) -> None:
    """Print one line naming the error and the log that holds its traceback; exit 1."""
    fd, log = tempfile.mkstemp(prefix="irconvert-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"irconvert {' '.join(sys.argv)}\n")
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=f)
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    click.echo(f"irconvert: internal error {type(exc).__name__}: {first} (a bug; traceback in {log})", err=True)
    sys.exit(1)


if __name__ == "__main__":
    main()
