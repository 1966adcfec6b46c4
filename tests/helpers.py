"""Helpers shared by several test files (fixtures live in conftest.py)."""

from irconvert.cli import main
from irconvert.runtime import kernels


def run_all(monkeypatch, backends, fn):
    """Return {backend: fn()} with IRCONVERT_RUNTIME set to each backend in turn."""
    out = {}
    for b in backends:
        monkeypatch.setenv(kernels.ENV_BACKEND, b)
        out[b] = fn()
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `irconvert ARGS` in this process; return (exit code, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
