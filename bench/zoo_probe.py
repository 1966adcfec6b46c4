"""Why a model fails the zoo's "learns" check: its loss curve on the sweep's batch, with one part changed.

    python -m bench.zoo_probe mobilenetv3_large_100                   # the check's own curve
    python -m bench.zoo_probe mobilenetv3_large_100 --small-head      # classifier from N(0, 0.01)
    python -m bench.zoo_probe torchvision:resnet50 --zero-init bn3    # scales of every *.bn3 zeroed (timm's init)
    python -m bench.zoo_probe mobilevitv2_050 --freeze-binary         # only the full-precision parts train
    python -m bench.zoo_probe mobilevitv2_050 --train-only head       # only parameters under `head` train
    python -m bench.zoo_probe efficientvit_b0 --threads 2             # the same run, sums in another order
    python -m bench.zoo_probe mobilenetv2_100 --fashion 300           # 300 steps on real Fashion-MNIST instead

Each run builds the model as bench/zoo_check.py does (seed 0, 10 classes, the smallest input size it runs
on, the same batch and labels), binarizes it with the default policy (or `--set field=json` Policy
fields), runs the 20 AdamW steps with dropout off and prints every step's loss and the drop the check
measures (mean of the last 5 against the first). `--fp` runs the unconverted model instead.

`--fashion STEPS` asks the question the fixed batch stands in for: does the conversion train on real
data? It trains the same converted model (calibrated on a real batch) for STEPS AdamW steps (lr 1e-3,
batch 64, dropout off) on Fashion-MNIST's training images, gray repeated to the model's channels and
resized to the sweep's input size, and prints the top-1 on FASHION_EVAL test images (chance: 10%)
beside the loss of every 10th step. Fashion-MNIST comes from Debian's dataset-fashion-mnist, as for
the recipes.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="'name' (timm) or 'torchvision:name'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the sweep's workers use 1)")
    ap.add_argument("--fp", action="store_true", help="train the unconverted model")
    ap.add_argument("--small-head", action="store_true", help="draw the classifier from N(0, 0.01) first")
    ap.add_argument("--zero-init", metavar="SUFFIX", help="zero the scale of every module whose name ends so")
    ap.add_argument("--freeze-binary", action="store_true", help="no parameter of a binary layer trains")
    ap.add_argument("--train-only", metavar="PREFIX", help="only parameters whose name starts so train")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a Policy field")
    ap.add_argument("--fashion", type=int, metavar="STEPS",
                    help="train STEPS steps on real Fashion-MNIST instead of the sweep's batch; print test top-1")
    args = ap.parse_args()

    import warnings

    import torch

    import irconvert
    from bench.zoo_check import (LAST_STEPS, adamw_steps, input_size, loss_curve, relative_drop, small_head,
                                 sweep_batch, sweep_model)

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = sweep_model(args.model)
    size = input_size(model)
    if args.fashion:
        from bench.zoo_check import train_deterministic

        batches = fashion_batches(size, args.fashion + 1)
        x, labels = batches[0]  # calibration
    else:
        x, labels = sweep_batch(size)
    if args.fashion or args.small_head:  # a fresh model, as the check's retry builds it (input_size ran this one)
        model = sweep_model(args.model)
    if args.small_head:
        if not small_head(model):
            ap.error(f"{args.model} has no single Linear or 1x1-conv classifier to redraw")
    if args.zero_init:
        hit = [m for n, m in model.named_modules() if n.endswith(args.zero_init) and getattr(m, "weight", None) is not None]
        if not hit:
            ap.error(f"no module of {args.model} with a weight has a name ending in {args.zero_init!r}")
        with torch.no_grad():
            for m in hit:
                m.weight.zero_()
    policy = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    net = model if args.fp else irconvert.binarize(model, inplace=True, calibrate=x, **policy)
    if args.freeze_binary:
        for _, layer in irconvert.binary_layers(net):
            for p in layer.parameters(recurse=False):
                p.requires_grad_(False)
    if args.train_only:
        for n, p in net.named_parameters():
            p.requires_grad_(n.startswith(args.train_only))
    if not any(p.requires_grad for p in net.parameters()):
        ap.error("no parameter is left to train")
    if args.fashion:
        train_deterministic(net)
        losses = adamw_steps(net, batches[1:])
        print(" ".join(f"{v:.2f}" for v in losses[::10]))
        top1 = fashion_top1(net.eval(), size)
        print(f"Fashion-MNIST top-1 after {args.fashion} steps: {top1:.1f}% on {FASHION_EVAL} test images "
              f"(chance 10%)")
        return
    curve = loss_curve(net, x, labels)
    print(" ".join(f"{v:.2f}" for v in curve))
    print(f"drop {100 * relative_drop(curve):.1f}% (mean of the last {LAST_STEPS} against the first)")


FASHION_BATCH = 64
FASHION_EVAL = 2000


def _fashion(split: str, size: tuple[int, ...]):
    """Yield normalized Fashion-MNIST (images, labels) batches of `split`, shaped for a model of input `size`."""
    import torch
    import torch.nn.functional as F

    from irconvert.data import build_data
    from irconvert.recipe import load_recipe
    from bench.accuracy import RECIPE

    cfg = load_recipe(RECIPE, ["data.hflip=0.0", "data.crop_padding=0", f"data.batch_size={FASHION_BATCH}",
                               "data.workers=0"]).data
    train, val = build_data(cfg).loaders(cfg, torch.Generator().manual_seed(0))
    for x, y in (train if split == "train" else val):
        x = F.interpolate(x.repeat(1, size[0], 1, 1), size=size[1:], mode="bilinear", align_corners=False)
        yield x, y


def fashion_batches(size: tuple[int, ...], n: int) -> list:
    """The first `n` training batches (a fixed shuffle)."""
    import itertools

    return list(itertools.islice(_fashion("train", size), n))


def fashion_top1(net, size: tuple[int, ...]) -> float:
    """Top-1 (%) of `net` in eval mode on the first FASHION_EVAL test images."""
    import torch

    right = seen = 0
    with torch.no_grad():
        for x, y in _fashion("val", size):
            out = net(x)
            out = out[0] if isinstance(out, (tuple, list)) else out
            right += int((out.argmax(-1) == y).sum())
            seen += len(y)
            if seen >= FASHION_EVAL:
                break
    return 100.0 * right / seen


if __name__ == "__main__":
    main()
