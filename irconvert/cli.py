"""The `irconvert` command line: `irconvert MODEL... --recipe R` converts; subcommands do the rest.

Every error a user can cause is an IRConvertError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import sys
import warnings

import click

from .errors import IRConvertError


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
@click.option("--method", default="irnet", show_default=True, help="Binarization method.")
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
@click.argument("models", nargs=-1, required=True)
@click.option("--recipe", "recipe_path", required=True, type=click.Path(dir_okay=False),
              help="Recipe YAML (see recipes/).")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local pretrained weights (.safetensors or .pth).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: the recipe's output.dir).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field, e.g. train.epochs=2.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@click.option("--seed", type=int, help="Seed (train.seed).")
@click.option("--device", help="auto, cpu, cuda, cuda:N (train.device).")
def convert_cmd(models, recipe_path, weights, out, overrides, resume, overwrite, seed, device):
    """Convert MODEL with a recipe: load, fine-tune, binarize, distill, evaluate, export."""
    from .convert import convert

    if len(models) > 1:
        raise IRConvertError("several models in one call: batch conversion is not available yet; convert one at a time")
    convert(models[0], recipe_path, out=out, weights=weights, overrides=tuple(overrides), resume=resume,
            overwrite=overwrite, seed=seed, device=device, log=click.echo)


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
