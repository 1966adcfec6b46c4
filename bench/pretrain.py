"""Train the full-precision Fashion-MNIST model that irconvert ships, the quickstart's pretrained input.

The network is the recipes' ResNet-18 for 28x28 grey images (stride-2 stem, no max-pool; see
recipes/fashion-mnist.yaml) at stage widths 16-32-64-128: 0.71 M parameters, about 4x fewer MACs
than 32-64-128-256 (a training step measured 79-115 ms vs 221-230 ms on 2 CPU cores, batch 128).
It is trained on the 60,000 training images with the recipe's augmentation (2-pixel random crop,
horizontal flip) and AdamW with a cosine schedule to zero, until the test accuracy plateaus, and
written as plain safetensors (a timm state_dict, 2.8 MB) with a JSON of its accuracy, curve and the
command that made it:

    python -m bench.pretrain                       # irconvert/pretrained/fashion-mnist-resnet18-w16.*
    python -m bench.pretrain --width 32 --epochs 10  # the 32-64-128-256 network

`train_teacher` is also the converged teacher of bench/accuracy.py, cached there by `teacher_key`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from irconvert.run import build_model
from irconvert.data import build_data
from irconvert.recipe import Recipe, load_recipe
from irconvert.train import Stage, evaluate, fit
from irconvert.write import atomic_path, write_text

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fashion-mnist.yaml"
OUT = ROOT / "irconvert" / "pretrained"


def widths(base: int) -> list[int]:
    """Return ResNet-18's four stage widths starting at `base` (64 is the standard network)."""
    return [base, 2 * base, 4 * base, 8 * base]


def teacher_recipe(width: int, epochs: int, lr: float, extra: tuple[str, ...] = ()) -> Recipe:
    """Return recipes/fashion-mnist.yaml on the whole training set with this width and FP schedule."""
    return load_recipe(RECIPE, [f"model.kwargs.channels={widths(width)}", "data.subset=null", "data.val_subset=null",
                                f"teacher.finetune.epochs={epochs}", f"teacher.finetune.lr={lr}", *extra])


def teacher_key(recipe: Recipe) -> str:
    """Return a hash of what shapes the FP model (the model, data and teacher sections, defaults left out,
    so that a new recipe field elsewhere or a new default does not orphan a cached model)."""
    body = recipe.model_dump(mode="json", include={"model", "data", "teacher"}, exclude_defaults=True)
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def plateaued(history: list[dict], window: int = 1, tol: float = 0.3) -> bool:
    """Return True when the best val top-1 of the last `window` epochs beats the best before by < tol points
    (with a cosine schedule to zero the last epoch's gain is what is left to gain)."""
    tops = [r["val_top1"] for r in history]
    if len(tops) <= window:
        return False
    return max(tops[-window:]) - max(tops[:-window]) < tol


def train_teacher(recipe: Recipe, device: torch.device, seed: int = 0,
                  log: Callable[[str], None] = print) -> tuple[nn.Module, dict, list[dict]]:
    """Train the recipe's FP model with its teacher schedule; return (model, test accuracy, per-epoch curve)."""
    data = build_data(recipe.data)
    torch.manual_seed(seed)
    model = build_model(recipe, data.info).to(device)
    train_loader, val_loader = data.loaders(recipe.data, torch.Generator(), seed)
    stage = Stage("teacher", model, recipe.teacher.finetune, seed)
    fit(stage, train_loader, val_loader, device,
        on_epoch=lambda st, ep, _: log(f"epoch {ep}: val top-1 {st.history[-1]['val_top1']:.2f}%"))
    return model, evaluate(model, val_loader, device), stage.history


def save_weights(model: nn.Module, path: Path, meta: dict) -> None:
    """Write the model's state_dict as safetensors (atomically) with a JSON of how it was made next to it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"irconvert_pretrain": json.dumps(meta)})
    write_text(path.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16, help="first stage width (16: 16-32-64-128)")
    ap.add_argument("--epochs", type=int, default=15, help="epochs of the cosine schedule")
    ap.add_argument("--lr", type=float, default=0.002, help="AdamW peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="weights file (default irconvert/pretrained/fashion-mnist-resnet18-wN.safetensors)")
    args = ap.parse_args()
    recipe = teacher_recipe(args.width, args.epochs, args.lr)
    out = args.out or OUT / f"fashion-mnist-resnet18-w{args.width}.safetensors"
    t0 = time.time()
    model, acc, history = train_teacher(recipe, torch.device(args.device), args.seed)
    meta = {
        "model": recipe.model.name, "channels": widths(args.width), "first_stride": recipe.model.first_stride,
        "stem_pool": recipe.model.stem_pool, "dataset": "fashion-mnist", "num_classes": 10, "in_chans": 1,
        "test_top1": round(acc["top1"], 2), "test_top5": round(acc["top5"], 2), "epochs": args.epochs,
        "converged": plateaued(history), "seed": args.seed, "lr": args.lr,
        "converged_rule": "the last epoch raised the best test top-1 by less than 0.3 points",
        "parameters": sum(p.numel() for p in model.parameters()),
        "minutes": round((time.time() - t0) / 60, 1), "device": f"{args.device} ({torch.get_num_threads()} threads, "
        f"{platform.machine()}, shared machine)",
        "command": "python -m bench.pretrain " + " ".join(sys.argv[1:]), "teacher_key": teacher_key(recipe),
        "curve": [{k: r[k] for k in ("epoch", "train_loss", "val_top1", "seconds")} for r in history],
    }
    save_weights(model, out, meta)
    print(f"FP top-1 {acc['top1']:.2f}% after {args.epochs} epochs ({meta['minutes']} min); wrote {out}")


if __name__ == "__main__":
    main()
