"""The one exception type for problems a user can fix, and how warnings reach the user's log."""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator


# What a message tells the user to change, in the caller's words: a Python caller passes an argument, a
# command line user a flag. A message names it once with `flag(name)`; str(error) says the Python
# form, error.cli() the flag. {v} is the value given to flag().
_FLAGS = {
    "resume": ("resume=True", "--resume"),
    "overwrite": ("overwrite=True", "--overwrite"),
    "out": ("out=DIR", "--out DIR"),
    "weights": ("weights=PATH", "--weights FILE"),
    "recipe": ("recipe=PATH", "--recipe FILE"),
    "latent": ("latent=PATH", "--latent FILE"),
    "runtime": ("runtime=True", "--runtime"),
    "set": ("overrides=[{v!r}]", "--set {v}"),
}
_LABELS = {"resume": ("resume", "--resume"), "recipe": ("recipe", "--recipe"), "latent": ("latent", "--latent"),
           "out": ("out", "--out"), "set": ("overrides {v!r}", "--set {v}")}
_MARK = re.compile("\x00([a-z]+)\x1f(.*?)\x1f([01])\x00")


def flag(name: str, value: str = "", label: bool = False) -> str:
    """Return a marker for what the user passes to change `name`: 'resume=True' in Python, '--resume' on
    the command line; `label` for the 'where' part that starts a message ('resume:' / '--resume:')."""
    if name not in (_LABELS if label else _FLAGS):
        raise KeyError(name)
    return f"\x00{name}\x1f{value}\x1f{int(label)}\x00"


def _render(text: str, cli: bool) -> str:
    def one(m: re.Match) -> str:
        name, value, label = m.group(1), m.group(2), m.group(3) == "1"
        return (_LABELS if label else _FLAGS)[name][int(cli)].format(v=value)

    return _MARK.sub(one, text)


class IRConvertError(Exception):
    """A bad input (recipe, model name, file, folder): the message says what, where and how to fix it.

    The CLI prints it (`cli()`: with the flags the user passes) as one line on stderr and exits with code 2;
    anything else is a bug. str() names function arguments and recipe fields instead (see `flag`).
    """

    def __str__(self) -> str:
        return _render(super().__str__(), cli=False)

    def cli(self) -> str:
        """Return the message as the command line says it: flags for arguments."""
        return _render(super().__str__(), cli=True)


def result_log(log: Callable[..., None]) -> Callable[..., None]:
    """Return where a command's results go (tables, figures, files written): `log.result` where `log` has
    one (the CLI's console: results to stdout, progress and warnings to stderr), else `log` itself."""
    return getattr(log, "result", log)


@contextmanager
def logged_warnings(log: Callable[..., None]) -> Iterator[None]:
    """Catch every warning raised inside the block and pass each to `log` as 'warning: ...' at its end."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log(f"warning: {w.message}")
