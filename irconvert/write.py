"""Stage 7, write: the two safetensors files of a conversion (format and atomic writes in fileformat.py).

    model.safetensors   the latent full-precision weights (to continue training), format "irconvert-latent/1"
    packed.safetensors  the deployment file (layout in pack.py), format "irconvert-packed/2"
    packed.arch.pt2     with save_packed(..., embed=True) only: a user model's architecture (embed.py)

Both carry JSON metadata to rebuild the model without the training code's state: the model's name,
source and constructor kwargs, the binarization policy, the per-layer plan and gains, the Hardtanh swaps, the
irconvert version, the recipe hash, and a SHA-256 over all tensors so an edited file is caught.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .fileformat import (  # noqa: F401  (atomic_path, write_text, read: re-exported for callers of write)
    LATENT_FORMAT, PACKED_FORMAT, WORD_BITS, atomic_path, describe, read, tensor_digest, write_text,
)
from .embed import arch_path, export_architecture
from .pack import packed_state


def _save(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> Path:
    from safetensors.torch import save_file

    meta = dict(meta, sha256=tensor_digest(tensors))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    return path


def save_latent(model: nn.Module, path: os.PathLike | str, recipe_hash: Optional[str] = None) -> Path:
    """Write model.safetensors: latent weights and the metadata that rebuilds the model."""
    meta = dict(describe(model, recipe_hash), format=LATENT_FORMAT)
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return _save(_unshare(tensors), meta, Path(path))


def save_packed(model: nn.Module, path: os.PathLike | str, recipe_hash: Optional[str] = None,
                embed: Union[bool, torch.Tensor] = False) -> Path:
    """Write packed.safetensors: 1-bit packed binary weights, everything else as trained; with `embed`
    (True, or an example input batch) also the architecture as NAME.arch.pt2 beside it (embed.py)."""
    path = Path(path)
    tensors, layers = packed_state(model)
    meta = dict(describe(model, recipe_hash), format=PACKED_FORMAT, layers=json.dumps(layers),
                word_bits=str(WORD_BITS), bit_order="lsb-first", bit_one="-1", fan_in_order="OHWI")
    if embed is not False:
        example = embed if isinstance(embed, torch.Tensor) else None
        entry = export_architecture(model, arch_path(path), example)
        meta["architecture"] = json.dumps(entry)
        if not json.loads(meta["input_size"]) and len(entry["input_size"]) == 3:
            # the architecture was exported at this (C, H, W): verify and summary run the reload on it
            meta["input_size"] = json.dumps(entry["input_size"])
    return _save(_unshare({k: v.cpu() for k, v in tensors.items()}), meta, path)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        out[k] = v.clone() if ptr in seen else v
        if ptr is not None:
            seen.add(ptr)
    return out
