"""Native code built on first use: a C++ source of irconvert/csrc compiled with torch's JIT extension loader
for this machine's CPU (-march), cached per source, torch version and CPU in IRCONVERT_CACHE (default
~/.cache/irconvert). The bitwise runtime (runtime/kernels.py) and the fused training sign (fused/sign.py)
are built here."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch


def _cpu_signature() -> str:
    """Return the CPU's model and flags: a binary built with -march=native is only valid on that CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "irconvert"
    return Path(os.environ.get("IRCONVERT_CACHE") or default)


@functools.lru_cache(maxsize=None)
def build(march: str, source: str = "bitwise.cpp") -> tuple[Optional[ModuleType], str]:
    """Return (the extension compiled from irconvert/csrc/`source` or None, why not); built at most
    once per process, source and -march."""
    src = resources.files("irconvert") / "csrc" / source
    try:
        code = src.read_bytes()
        key = hashlib.sha256(code + f"|{torch.__version__}|{march}|{_cpu_signature()}".encode()).hexdigest()[:16]
        name = f"irconvert_{source.rsplit('.', 1)[0]}_{key}"
        build_dir = _cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob(f"{name}*.so")):  # a first build takes minutes: say so before it starts
            what = "bitwise" if source == "bitwise.cpp" else source.rsplit(".", 1)[0]
            print(f"irconvert: building the {what} kernel (once, ~1-2 min) in {build_dir} ...", file=sys.stderr,
                  flush=True)
        # torch logs "No CUDA runtime is found" on import where CUDA_HOME exists: irrelevant to a CPU kernel
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        # build.ninja records the source's path, and ninja rebuilds when it changes: compiling a copy kept in
        # the build folder lets every checkout of the same source (worktrees, CI clones) share one build
        copy = build_dir / f"{name}.cpp"
        if not copy.is_file() or copy.read_bytes() != code:
            tmp = build_dir / f".{name}.{os.getpid()}.cpp"
            tmp.write_bytes(code)
            os.replace(tmp, copy)
        ext = load(name=name, sources=[str(copy)], build_directory=str(build_dir), with_cuda=False,
                   extra_cflags=["-O3", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"])
        return ext, ""
    except Exception as exc:  # no compiler, no ninja, a failed compile: all mean "use the fallback"
        first = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {first[-1][:200] if first else ''}"
