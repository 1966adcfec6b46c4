"""Native code built on first use: a C++ source of irconvert/csrc compiled with torch's JIT extension loader
for this machine's CPU (-march), cached in IRCONVERT_CACHE (default ~/.cache/irconvert) under a key of
everything the binary depends on: the source, the flags, the CPU, and the torch it links against (its
version, git commit, C++ ABI and install folder, whose headers it includes) with the Python ABI. Two
environments with the same torch version but their own installs then keep one build each, instead of
rebuilding each other's (ninja rebuilds when a build folder's flags change). Every build is announced
on stderr before it starts. The bitwise runtime (runtime/kernels.py) and the fused training sign
(fused/sign.py) are built here."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch


def _cpu_signature() -> str:
    """Return the CPU's model and flags: a binary built with -march=native is only valid on that CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _torch_build() -> str:
    """Return what identifies the torch a binary links against and the Python it is loaded into."""
    parts = (torch.__version__, getattr(torch.version, "git_version", ""), str(Path(torch.__file__).resolve().parent),
             str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")), sysconfig.get_config_var("EXT_SUFFIX") or "",
             sys.implementation.cache_tag or "")
    return "|".join(parts)


def build_key(code: bytes, march: str) -> str:
    """Return the cache key of a build of `code` with -march=`march`: it changes with anything the binary depends on."""
    return hashlib.sha256(code + f"|{_torch_build()}|{march}|{_cpu_signature()}".encode()).hexdigest()[:16]


def _up_to_date(build_dir: Path, name: str) -> bool:
    """Whether `build_dir` holds a built `name` that ninja would not rebuild (its sources and headers unchanged)."""
    if not any(build_dir.glob(f"{name}*.so")) or not (build_dir / "build.ninja").is_file():
        return False
    ninja = shutil.which("ninja")
    if ninja is None:
        return False
    try:
        dry = subprocess.run([ninja, "-C", str(build_dir), "-n"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return dry.returncode == 0 and "no work to do" in dry.stdout


@contextlib.contextmanager
def _building(build_dir: Path) -> Iterator[None]:
    """Hold this build folder's own lock (an OS file lock, released when the process dies) and clear a torch
    build lock that a killed build left behind: torch's loader waits forever while its `lock` file exists,
    and while we hold ours no other irconvert process is building here, so such a file is stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock alone
        yield
        return
    with open(build_dir / ".irconvert.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        yield


def cache_dir() -> Path:
    """irconvert's cache folder: $IRCONVERT_CACHE, else $XDG_CACHE_HOME/irconvert or ~/.cache/irconvert."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "irconvert"
    return Path(os.environ.get("IRCONVERT_CACHE") or default)


@functools.lru_cache(maxsize=None)
def build(march: str, source: str = "bitwise.cpp") -> tuple[Optional[ModuleType], str]:
    """Return (the extension compiled from irconvert/csrc/`source` or None, why not); built at most
    once per process, source and -march."""
    src = resources.files("irconvert") / "csrc" / source
    try:
        code = src.read_bytes()
        name = f"irconvert_{source.rsplit('.', 1)[0]}_{build_key(code, march)}"
        build_dir = cache_dir() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not _up_to_date(build_dir, name):  # a build takes from seconds to minutes: say so before it starts
            what = "bitwise" if source == "bitwise.cpp" else source.rsplit(".", 1)[0]
            again = "rebuilding" if any(build_dir.glob(f"{name}*.so")) else "building"
            print(f"irconvert: {again} the {what} kernel (once per torch install and CPU, ~1-2 min) in {build_dir} ...",
                  file=sys.stderr, flush=True)
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
        with _building(build_dir):
            ext = load(name=name, sources=[str(copy)], build_directory=str(build_dir), with_cuda=False,
                       extra_cflags=["-O3", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"])
        return ext, ""
    except Exception as exc:  # no compiler, no ninja, a failed compile: all mean "use the fallback"
        first = str(exc).strip().splitlines()
        return None, f"{type(exc).__name__}: {first[-1][:200] if first else ''}"
