"""Training throughput (images/s, all processes together) of the Fashion-MNIST recipe's model, full
precision vs binarized, on real data. Runs alone or under torchrun:

    python bench/throughput.py                                   # 1 process
    torchrun --standalone --nproc_per_node=2 bench/throughput.py # 2 processes (gloo on CPU)
    python bench/throughput.py --device cuda --amp bf16 --steps 300   # the GPU check

Prints one JSON line (rank 0); bench/distributed.py runs the CPU cases and writes the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import irconvert
from irconvert import distributed
from irconvert.run import build_model
from irconvert.data import build_data
from irconvert.recipe import load_recipe
from irconvert.train import _autocast, logits_of

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion-mnist.yaml"


def measure(model, loader, device, amp: str, steps: int, warmup: int = 3) -> float:
    """Return seconds for `steps` training steps after `warmup` ones."""
    net = DistributedDataParallel(model) if dist.is_initialized() else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    batches = iter(loader)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            distributed.barrier()
            t0 = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(logits_of(net(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over processes)")
    args = ap.parse_args()
    device = torch.device(args.device)
    world = distributed.setup("auto", device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    recipe = load_recipe(RECIPE, [f"data.batch_size={args.batch // world.size}"])
    data = build_data(recipe.data)
    train, _ = data.loaders(recipe.data, torch.Generator(), 0, world.rank, world.size)
    torch.manual_seed(0)
    fp = build_model(recipe, data).to(device)
    binary = irconvert.binarize(fp, recipe.binarize).to(device)
    result = {"processes": world.size, "threads_per_process": torch.get_num_threads(), "device": str(device),
              "amp": args.amp, "global_batch": args.batch, "steps": args.steps,
              "card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name, model in (("fp32", fp), ("binary", binary)):
        seconds = measure(model, train, device, args.amp, args.steps)
        result[f"{name}_img_s"] = round(args.steps * args.batch / seconds, 1)
    if world.main:
        print(json.dumps(result), flush=True)
    distributed.teardown()


if __name__ == "__main__":
    main()
