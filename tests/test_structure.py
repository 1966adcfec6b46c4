"""The package's shape: each module imports only the modules before it in the walk, and no function
is longer than a screen."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "irconvert"

# The declared order, lowest first: shared pieces, the papers' parts and the binary layers, then the
# stages as the data walks them (load -> analyze -> plan -> swap -> train -> pack -> write -> verify),
# then what runs them. A module may import only modules listed before it.
ORDER = [
    "version", "errors", "shipped", "ops", "fileformat", "graph", "native",
    "fused",  # the fused training ops: the binary sign with its surrogate gradients, saved int8 signs
    "methods",  # the papers' parts and the method registry (its own modules import one another freely)
    "layers", "shortcut", "attention",
    "origin", "models",  # load
    "analyze", "plan", "calibrate", "recipe", "data",
    "layer_summary", "swap", "distributed", "distill", "flips",
    "train", "pack", "embed", "write", "verify",
    "tflite", "lce",  # the LCE flatbuffer (reads a packed file through verify) and its check in LCE's interpreter
    "runtime",  # bitwise inference on a verified model (its own modules import one another freely)
    "runfolder", "run", "batch", "commands", "cli",
]
MAX_LINES = 60


PACKAGES = ("fused", "methods", "runtime")


def _module(path: Path) -> str:
    return path.relative_to(PKG).with_suffix("").parts[0]


def _imports(path: Path) -> set[str]:
    """The irconvert modules `path` imports, anywhere in the file (function-local imports too)."""
    found = set()
    inside_package = path.parent.name in PACKAGES
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = (node.module or "").split(".")[0]
            if node.level == 1 and inside_package:
                continue  # the package's own modules
            if base:
                found.add(base)
            else:  # from . import x
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("irconvert."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("irconvert."))
    return found


def _files():
    return [p for p in sorted(PKG.rglob("*.py")) if p.name not in ("__init__.py", "__main__.py") or p.parent.name in PACKAGES]


def test_every_module_has_a_place_in_the_order():
    assert {_module(p) for p in _files()} == set(ORDER)


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG)))
def test_module_imports_only_modules_before_it(path):
    me = ORDER.index(_module(path))
    later = sorted(m for m in _imports(path) if m in ORDER and ORDER.index(m) >= me)
    assert not later, f"{path.name} imports {later}, which come after it (or are it) in the walk"


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.name} ({lines} lines)")
    assert not long


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from irconvert.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent)
    assert res.returncode == 0 and res.stdout.strip().endswith("False"), res.stdout + res.stderr
