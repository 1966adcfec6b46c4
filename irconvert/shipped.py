"""The recipes shipped with irconvert: irconvert/recipes/*.yaml, installed with the package (in a
checkout `recipes/` is a link to that folder, so `--recipe recipes/quickstart.yaml` works from its root).
A recipe is found by its path, or from any folder by a shipped recipe's name: `--recipe quickstart`.
Torch-free, so that the command line checks --recipe before anything heavy is imported."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from .errors import IRConvertError

FOLDER = Path(__file__).resolve().parent / "recipes"


def names() -> list[str]:
    """Return the names of the shipped recipes (their file names without .yaml), sorted."""
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def find(recipe: Union[str, os.PathLike]) -> Path:
    """Return the recipe file `recipe` names: an existing file, else the shipped recipe of that name
    ('quickstart' or 'quickstart.yaml'); raise IRConvertError listing the shipped ones if neither."""
    path = Path(recipe)
    if path.is_file():
        return path
    if len(path.parts) == 1 and not path.exists():
        shipped = FOLDER / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    raise IRConvertError(f"{recipe}: recipe not found; pass an existing YAML file or a shipped recipe's name "
                         f"({', '.join(names())}; irconvert list-recipes shows them)")


def describe(name: str) -> str:
    """Return the first sentence of the comment that opens the shipped recipe `name`."""
    lines = []
    for line in (FOLDER / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= 100 else first[:99].rstrip() + "…"
