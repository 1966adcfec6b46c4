"""Stage 8, verify (LCE flatbuffer): run a .tflite in Larq Compute Engine's own interpreter and compare it
with `load_packed` of the packed file it was exported from.

LCE's PyPI wheel (`pip install 'irconvert[lce]'`, Linux x86_64 and macOS) holds the interpreter as
`larq_compute_engine/tflite/python/interpreter_wrapper_lite.so`. Two things stand between it and
irconvert's environment: the package's `__init__` imports TensorFlow (the .so itself does not need
it, so it is loaded by file path), and the .so is built with an old pybind11 that fails on numpy 2
("Expected N bytes but got 0"). So it runs in a subprocess whose sys.path starts with a folder
holding numpy 1.26, which irconvert installs once into its cache (~/.cache/irconvert/lce-numpy-cpXY)
with `pip install --target`.

Kernels: LCE's LceBconv2d has three implementations, all of which run on x86: the default
(optimized BGEMM, built with RUY), the reference kernel, and the indirect BGEMM kernel. `run_tflite`
runs any of them; `verify_tflite` all three.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import IRConvertError, result_log

KERNELS = {"optimized": (False, False), "reference": (True, False), "indirect": (False, True)}
INSTALL = "pip install 'irconvert[lce]'"
NUMPY = "numpy==1.26.4"

_WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import importlib.util
import numpy as np
spec = importlib.util.spec_from_file_location("interpreter_wrapper_lite", sys.argv[2])
lite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lite)
model = open(sys.argv[3], "rb").read()
x = np.load(sys.argv[4])
out = {}
import time
repeat = int(sys.argv[6])
for arg in sys.argv[7:]:
    name, ref, ind = arg.split(":")
    it = lite.LiteInterpreter(model, 1, ref == "1", ind == "1", False)
    out[name] = np.concatenate([it.predict([x[i:i + 1]])[0] for i in range(len(x))])
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        it.predict([x[:1]])
        times.append(time.perf_counter() - t)
    if times:
        out[name + "__seconds"] = np.float64(sorted(times)[len(times) // 2])
np.savez(sys.argv[5], **out)
"""


def interpreter_path() -> Path:
    """The LCE interpreter's .so; IRConvertError saying how to install it where LCE is missing."""
    spec = importlib.util.find_spec("larq_compute_engine")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise IRConvertError(f"Larq Compute Engine's interpreter is not installed: {INSTALL} "
                             "(wheels for Linux x86_64 and macOS)")
    so = Path(list(spec.submodule_search_locations)[0]) / "tflite" / "python" / "interpreter_wrapper_lite.so"
    if not so.is_file():
        raise IRConvertError(f"{so}: LCE's interpreter is missing from its package; reinstall: {INSTALL}")
    return so


def numpy_folder() -> Path:
    """A folder holding numpy < 2 for the interpreter's subprocess (installed into irconvert's cache on first use)."""
    from .native import cache_dir  # IRCONVERT_CACHE, as the kernels' cache

    cache = cache_dir()
    folder = cache / f"lce-numpy-cp{sys.version_info.major}{sys.version_info.minor}"
    if (folder / "numpy" / "__init__.py").is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".lce-numpy.", dir=cache))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary", ":all:", "--target", str(tmp), NUMPY]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = subprocess.CompletedProcess(cmd, 1, "", str(exc))
    if done.returncode != 0 or not (tmp / "numpy" / "__init__.py").is_file():
        _rmtree(tmp)
        last = (done.stderr or done.stdout or "").strip().splitlines()
        raise IRConvertError(f"LCE's interpreter needs numpy<2 of its own and installing it failed "
                             f"({last[-1][:120] if last else 'pip failed'}); run: {sys.executable} -m pip install "
                             f"--target {folder} {NUMPY}")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process installed it meanwhile
        _rmtree(tmp)
    return folder


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def run_tflite(model: Union[str, os.PathLike], x: np.ndarray, kernels: Sequence[str] = tuple(KERNELS),
               repeat: int = 0) -> dict[str, np.ndarray]:
    """Return {kernel: outputs} of the .tflite `model` on float32 input `x` (NHWC, any batch: run one at a time);
    with `repeat`, also {kernel + '__seconds': median time of one image, single thread} (x86: not an ARM figure)."""
    so = interpreter_path()
    folder = numpy_folder()
    with tempfile.TemporaryDirectory(prefix="irconvert-lce-") as tmp:
        xin, yout = Path(tmp) / "x.npy", Path(tmp) / "y.npz"
        np.save(xin, np.ascontiguousarray(x, dtype=np.float32))
        specs = [f"{k}:{int(KERNELS[k][0])}:{int(KERNELS[k][1])}" for k in kernels]
        cmd = [sys.executable, "-I", "-c", _WORKER, str(folder), str(so), str(model), str(xin), str(yout), str(repeat),
               *specs]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not yout.is_file():
            last = (done.stderr or done.stdout or "").strip().splitlines()
            raise IRConvertError(f"{model}: LCE's interpreter failed ({last[-1][:200] if last else done.returncode})")
        with np.load(yout) as f:
            return {k: f[k] for k in f.files}


def compare(reference: np.ndarray, outputs: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per kernel: max abs difference, max difference relative to max |reference|, top-1 agreement."""
    scale = float(np.abs(reference).max()) or 1.0
    rows = {}
    for k, y in outputs.items():
        d = float(np.abs(y.reshape(reference.shape) - reference).max())
        row = {"max_abs": d, "max_rel": d / scale}
        if reference.ndim == 2:
            row["top1_agree"] = float((y.reshape(reference.shape).argmax(1) == reference.argmax(1)).mean())
        rows[k] = row
    return rows


def verify_tflite(path: Union[str, os.PathLike], recipe=None, n_random: int = 4,
                  n_val: Optional[int] = None, log=print) -> dict:
    """Run `path` in all three LCE kernels against load_packed of the packed.safetensors beside it on random
    inputs and, with `recipe`, on its validation images (top-1 agreement); return the figures."""
    import torch

    from .verify import load_packed

    path = Path(path)
    if not path.is_file():
        raise IRConvertError(f"{path}: file not found")
    packed = path.with_name("packed.safetensors")
    if not packed.is_file():
        raise IRConvertError(f"{path}: no packed.safetensors beside it to compare with; export the .tflite into "
                             "the packed file's folder")
    net = load_packed(packed)
    from .layer_summary import default_input_size

    size = tuple(net.irconvert_input_size or default_input_size(net))
    x = torch.randn((n_random,) + size, generator=torch.Generator().manual_seed(0))
    result = {"random": _check(net, path, x), "tflite_bytes": path.stat().st_size,
              "packed_bytes": packed.stat().st_size}
    say = result_log(log)  # the figures are the command's result: stdout on the command line
    say(_lines("random inputs", result["random"]))
    if recipe is not None:
        xv, yv = _val_images(recipe, size, n_val)
        rows = _check(net, path, xv, yv)
        result["validation"] = rows
        say(_lines(f"{len(xv)} validation images", rows))
    return result


def verify_tflite_cli(path: Union[str, os.PathLike], recipe=None, tolerance: float = 1e-4, log=print) -> dict:
    """`irconvert verify model.tflite [--recipe R]`: print the figures and return them, with 'ok' False (the CLI's
    exit code 1) where a kernel differs from the packed file by more than `tolerance` relative on random inputs or
    (with a recipe) picks another top-1 anywhere."""
    r = verify_tflite(path, recipe, log=log)
    say = result_log(log)
    say(f"model.tflite {r['tflite_bytes'] / 2**20:.2f} MiB, packed.safetensors {r['packed_bytes'] / 2**20:.2f} MiB "
        f"(ratio {r['tflite_bytes'] / r['packed_bytes']:.3f})")
    bad = [k for k, row in r["random"].items() if row["max_rel"] > tolerance]
    bad += [f"{k} (top-1)" for k, row in r.get("validation", {}).items() if row.get("top1_agree", 1.0) < 1.0]
    r.update(tolerance=tolerance, ok=not bad, mismatch=bad)
    if bad:
        say(f"MISMATCH in {', '.join(bad)} (tolerance {tolerance:g} relative)")
    else:
        say(f"ok: all three LCE kernels match the packed file (tolerance {tolerance:g} relative)")
    return r


def _check(net, path: Path, x, labels=None) -> dict:
    import torch

    with torch.no_grad():
        ref = net(x).float()
    nhwc = x.permute(0, 2, 3, 1).numpy() if x.dim() == 4 else x.numpy()
    outs = run_tflite(path, nhwc)
    ref_np = ref.numpy()
    if ref_np.ndim == 4:
        ref_np = ref_np.transpose(0, 2, 3, 1)
    rows = compare(ref_np, outs)
    if labels is not None and ref_np.ndim == 2:
        y = labels.numpy()
        rows["packed"] = {"top1": float((ref_np.argmax(1) == y).mean())}
        for k, out in outs.items():
            rows[k]["top1"] = float((out.reshape(ref_np.shape).argmax(1) == y).mean())
    return rows


def _val_images(recipe, size, n: Optional[int]):
    import torch

    from .data import build_data
    from .recipe import resolve_recipe

    recipe = resolve_recipe(recipe)
    loader = build_data(recipe.data).loaders(recipe.data, torch.Generator(), recipe.train.seed)[1]
    xs, ys = [], []
    for xb, yb in loader:
        xs.append(xb)
        ys.append(yb)
        if n is not None and sum(len(b) for b in xs) >= n:
            break
    x, y = torch.cat(xs)[:n], torch.cat(ys)[:n]
    if tuple(x.shape[1:]) != tuple(size):
        raise IRConvertError(f"--recipe: its images are {tuple(x.shape[1:])}, the model was exported for {tuple(size)}")
    return x.float(), y


def _lines(what: str, rows: dict) -> str:
    out = [f"{what}:"]
    for k, r in rows.items():
        parts = [f"max |lce - packed| {r['max_abs']:.3g} ({r['max_rel']:.3g} relative)"] if "max_abs" in r else []
        if "top1_agree" in r:
            parts.append(f"top-1 agreement {100 * r['top1_agree']:.2f}%")
        if "top1" in r:
            parts.append(f"top-1 {100 * r['top1']:.2f}%")
        out.append(f"  {k:10s} " + "   ".join(parts))
    return "\n".join(out)
