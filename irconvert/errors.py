"""The one exception type for problems a user can fix, and how warnings reach the user's log."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator


class IRConvertError(Exception):
    """A bad input (recipe, model name, file, folder): the message says what, where and how to fix it.

    The CLI prints it as one line on stderr and exits with code 2; anything else is a bug.
    """


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
