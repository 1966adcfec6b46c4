"""Data-parallel training under torchrun: one process per GPU (or CPU worker), on one or many machines.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; `start` picks the device and
`setup` joins the process group (NCCL on GPUs, gloo on CPUs, unless the recipe names one). The run
asks the returned `World` (`rank`, `size`, `main`); training sums validation counts with `sum_all`.
Without torchrun there is one process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import IRConvertError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the one process that writes files and prints."""
        return self.rank == 0


def from_env() -> World:
    """Return this process's place in the torchrun job (rank 0 of 1 without torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def setup(backend: str, device: torch.device) -> World:
    """Join the process group of a torchrun job; `backend` 'auto' is NCCL on CUDA, gloo otherwise."""
    w = from_env()
    if w.size > 1 and not dist.is_initialized():
        chosen = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        if device.type == "cuda":
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group(chosen)
    return w


def resolve_device(name: str) -> torch.device:
    """Return the torch device for 'auto', 'cpu', 'cuda', 'cuda:1', ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise IRConvertError(f"train.device: {name!r} is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IRConvertError(f"train.device: {name} asked for, but no CUDA GPU is available; use cpu")
    return dev


def start(device: str, backend: str) -> tuple[torch.device, World]:
    """Return this process's device (its own GPU under torchrun) and place, the group joined."""
    dev = resolve_device(device)
    world = setup(backend, dev)
    if world.size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", world.local_rank)
    return dev, world


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if dist.is_initialized():
        dist.barrier()


def sum_all(values: list[float]) -> list[float]:
    """Return the element-wise sum of `values` over all processes."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def teardown() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()
