"""Why a model fails the zoo's "learns" check: its loss curve on the sweep's batch, with one part changed.

    python -m bench.zoo_probe mobilenetv3_large_100                   # the check's own curve
    python -m bench.zoo_probe mobilenetv3_large_100 --small-head      # classifier from N(0, 0.01)
    python -m bench.zoo_probe torchvision:resnet50 --zero-init bn3    # scales of every *.bn3 zeroed (timm's init)
    python -m bench.zoo_probe mobilevitv2_050 --freeze-binary         # only the full-precision parts train
    python -m bench.zoo_probe mobilevitv2_050 --train-only head       # only parameters under `head` train
    python -m bench.zoo_probe efficientvit_b0 --threads 2             # the same run, sums in another order

Each run builds the model as bench/zoo_check.py does (seed 0, 10 classes, the smallest input size it runs
on, the same batch and labels), binarizes it with the default policy (or `--set field=json` Policy
fields), runs the 20 AdamW steps with dropout off and prints every step's loss and the drop the check
measures (mean of the last 5 against the first). `--fp` runs the unconverted model instead.
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
    args = ap.parse_args()

    import warnings

    import torch

    import irconvert
    from bench.zoo_check import (LAST_STEPS, input_size, loss_curve, relative_drop, small_head, sweep_batch,
                                 sweep_model)

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    model = sweep_model(args.model)
    x, labels = sweep_batch(input_size(model))
    if args.small_head:  # a fresh model, as the check's retry builds it (input_size ran the first one)
        model = sweep_model(args.model)
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
    curve = loss_curve(net, x, labels)
    print(" ".join(f"{v:.2f}" for v in curve))
    print(f"drop {100 * relative_drop(curve):.1f}% (mean of the last {LAST_STEPS} against the first)")


if __name__ == "__main__":
    main()
