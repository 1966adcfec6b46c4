"""The file format of the two safetensors files (`write` writes them, `verify` reads them), and the
atomic file writes every stage uses. Below both, so that reading a file needs no writer.

    model.safetensors   latent weights, format "irconvert-latent/1"
    packed.safetensors  deployment file, format "irconvert-packed/2" (layout in pack.py; /1 still reads)

Metadata (JSON strings): model origin, policy, per-layer plan and gains, Hardtanh swaps (and RPReLU's
parameter shapes where the policy puts RPReLU in their place), shortcuts,
irconvert version, recipe hash, input size, and sha256 = SHA-256 over (name, dtype, shape, bytes)
of every tensor in name order, so that an edited file is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from .errors import IRConvertError
from .version import __version__

WORD_BITS = 32  # sign bits per packed word (pack.py); the runtime repacks to 64 at load
LATENT_FORMAT = "irconvert-latent/1"
PACKED_FORMAT = "irconvert-packed/2"
# older formats this version still reads: a /1 packed file is a /2 file without the optional fields
READABLE = {"irconvert-packed/1"}


@contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes it 0600 (and safetensors writes 0600 too): give it the mode open() would give
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_text(path: os.PathLike | str, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """Return the SHA-256 of all tensors' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def describe(model: nn.Module, recipe_hash: Optional[str] = None) -> dict[str, str]:
    """Return the metadata that rebuilds `model`'s architecture and binarization (JSON strings)."""
    the_plan = getattr(model, "irconvert_plan", None)
    if the_plan is None:
        raise IRConvertError("model is not binarized: call irconvert.binarize(model) before exporting")
    origin = getattr(model, "irconvert_origin", None)
    return {
        "irconvert_version": __version__,
        "model": json.dumps(origin),
        "policy": the_plan.policy.model_dump_json(),
        "plan": json.dumps({n: p.mode for n, p in the_plan.layers.items()}),
        "gain": json.dumps({n: p.gain for n, p in the_plan.layers.items() if p.gain}),
        "grad_scale": json.dumps({n: p.grad_scale for n, p in the_plan.layers.items() if p.grad_scale != 1.0}),
        "hardtanh": json.dumps(list(the_plan.hardtanh)),
        "rprelu": json.dumps({n: list(s) for n, s in the_plan.rprelu.items()}),
        "shortcuts": json.dumps([list(p) for p in the_plan.shortcuts]),
        "recipe_hash": recipe_hash or "",
        "input_size": json.dumps(list(getattr(model, "irconvert_input_size", None) or [])),
    }


def packed_in(path: os.PathLike | str) -> Path:
    """Return `path`, or for a run folder the packed.safetensors in it (what verify, eval and bench-runtime read)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "packed.safetensors").is_file():
            raise IRConvertError(f"{path}: a folder without packed.safetensors; pass a run folder (export it first: "
                                 f"irconvert export {path}) or a packed.safetensors file")
        return path / "packed.safetensors"
    return path


def read(path: os.PathLike | str, want_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors, metadata) of an irconvert file, or raise IRConvertError naming the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise IRConvertError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise IRConvertError(f"{path}: not a readable safetensors file, truncated or corrupted "
                             f"({str(exc).splitlines()[0][:120]}); export it again") from None
    fmt = meta.get("format", "")
    if not fmt.startswith("irconvert-"):
        raise IRConvertError(f"{path}: not an irconvert file (no irconvert format in its metadata)")
    kind, _, version = fmt.partition("/")
    want_kind, _, want_version = want_format.partition("/")
    if kind != want_kind:
        raise IRConvertError(f"{path}: is a {kind} file, expected {want_kind} "
                             f"({'packed.safetensors' if 'packed' in want_kind else 'model.safetensors'})")
    if version != want_version and fmt not in READABLE:
        raise IRConvertError(f"{path}: format {fmt} was written by irconvert {meta.get('irconvert_version', '?')}; "
                             f"this irconvert {__version__} reads {want_format}; use the matching irconvert version")
    if meta.get("sha256") != tensor_digest(tensors):
        raise IRConvertError(f"{path}: contents do not match their checksum (the file was edited or corrupted); "
                             "export it again")
    return tensors, meta
