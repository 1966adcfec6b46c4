"""Why a model fails the zoo's "learns" check: its loss curve on the sweep's batch, with one part changed.

    python -m bench.zoo_probe mobilenetv3_large_100                   # the check's own curve
    python -m bench.zoo_probe mobilenetv3_large_100 --small-head      # classifier from N(0, 0.01)
    python -m bench.zoo_probe torchvision:resnet50 --zero-init bn3    # scales of every *.bn3 zeroed (timm's init)
    python -m bench.zoo_probe mobilevitv2_050 --freeze-binary         # only the full-precision parts train
    python -m bench.zoo_probe mobilevitv2_050 --train-only head       # only parameters under `head` train
    python -m bench.zoo_probe efficientvit_b0 --threads 2             # the same run, sums in another order
    python -m bench.zoo_probe mobilenetv2_100 --ede-t 1               # EDE's t held at 1 (a soft clip)
    python -m bench.zoo_probe mobilenetv2_100 --fashion 300           # 300 steps on real Fashion-MNIST instead
    python -m bench.zoo_probe mobilenetv2_100 --fashion 300 --record zoo-probe-fashion  # and keep the result
    python -m bench.zoo_probe mobilenetv2_100 --fashion 300 --pretrain 300   # convert a trained model instead

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
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="'name' (timm) or 'torchvision:name'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the sweep's workers use 1)")
    ap.add_argument("--fp", action="store_true", help="train the unconverted model")
    ap.add_argument("--small-head", action="store_true", help="draw the classifier from N(0, 0.01) first")
    ap.add_argument("--zero-init", metavar="SUFFIX", help="zero the scale of every module whose name ends so")
    ap.add_argument("--freeze-binary", action="store_true", help="no parameter of a binary layer trains")
    ap.add_argument("--train-only", metavar="PREFIX", help="only parameters whose name starts so train")
    ap.add_argument("--ede-t", type=float, metavar="T", help="EDE's t for every binary layer (default: its start, 1e-3)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a Policy field")
    ap.add_argument("--fashion", type=int, metavar="STEPS",
                    help="train STEPS steps on real Fashion-MNIST instead of the sweep's batch; print test top-1")
    ap.add_argument("--pretrain", type=int, metavar="STEPS",
                    help="with --fashion: first train the FP model STEPS steps on the same batches, then convert it "
                         "(a recipe's teacher fine-tune: the conversion of a trained model)")
    ap.add_argument("--record", metavar="NAME",
                    help="also add this run to bench/results/NAME.{json,md} (a row per distinct command)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if args.pretrain and not args.fashion:
        ap.error("--pretrain trains on Fashion-MNIST: give --fashion STEPS too")
    policy = {}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            policy[field] = json.loads(value)
        except ValueError:
            ap.error(f"--set {item}: the value is not JSON; a string needs its quotes: --set '{field}=\"{value}\"'")
    from pydantic import ValidationError

    from irconvert.plan import Policy

    try:
        Policy(**policy)
    except ValidationError as exc:
        ap.error("--set: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

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

        batches = fashion_batches(size, max(args.fashion, args.pretrain or 0) + 1)
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
    fp_top1 = None
    if args.pretrain:
        train_deterministic(model)
        adamw_steps(model, batches[1:args.pretrain + 1])
        fp_top1 = fashion_top1(model.eval(), size)
        print(f"FP model after {args.pretrain} steps: {fp_top1:.1f}%")
    net = model if args.fp else irconvert.binarize(model, inplace=True, calibrate=x, **policy)
    if args.ede_t is not None:
        irconvert.set_ede(net, args.ede_t)
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
        losses = adamw_steps(net, batches[1:args.fashion + 1])
        print(" ".join(f"{v:.2f}" for v in losses[::10]))
        top1 = fashion_top1(net.eval(), size)
        print(f"Fashion-MNIST top-1 after {args.fashion} steps: {top1:.1f}% on {FASHION_EVAL} test images "
              f"(chance 10%)")
        if args.record:
            record(args.record, {"top1": round(top1, 1), "losses": [round(v, 3) for v in losses[::10]],
                                 "seconds": round(time.perf_counter() - t0, 1),
                                 **({"pretrained_top1": round(fp_top1, 1)} if fp_top1 is not None else {})})
        return
    curve = loss_curve(net, x, labels)
    print(" ".join(f"{v:.2f}" for v in curve))
    print(f"drop {100 * relative_drop(curve):.1f}% (mean of the last {LAST_STEPS} against the first)")
    if args.record:
        record(args.record, {"drop": relative_drop(curve), "losses": [round(v, 3) for v in curve],
                             "seconds": round(time.perf_counter() - t0, 1)})


def record(name: str, row: dict) -> None:
    """Add `row` (this command's result) to bench/results/NAME.json, replacing an earlier run of the same
    command, and rewrite NAME.md; a lock file lets probes that run side by side record into one table."""
    import fcntl
    import shlex
    import sys
    from datetime import datetime, timezone

    from bench.common import RESULTS, write_results

    argv = sys.argv[1:]
    if "--record" in argv:  # the command as it is run without recording
        i = argv.index("--record")
        argv = argv[:i] + argv[i + 2:]
    row = {"command": " ".join(["python -m bench.zoo_probe", *map(shlex.quote, argv)]),
           "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **row}
    path = RESULTS / f"{name}.json"
    with open(RESULTS / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if r["command"] != row["command"]] + [row]
        write_results(name, rows, table(rows), results=RESULTS, quiet=True)


def table(rows: list[dict]) -> str:
    """The Markdown table of recorded probe runs, one row per command."""
    lines = ["| command | FP top-1 after --pretrain (%) | Fashion-MNIST top-1 (%) | loss drop on the batch "
             "| loss, first -> last | seconds |", "|---|---:|---:|---:|---|---:|"]
    for r in rows:
        top1 = f"{r['top1']:.1f}" if "top1" in r else "-"
        drop = f"{100 * r['drop']:.1f}%" if "drop" in r else "-"
        pre = f"{r['pretrained_top1']:.1f}" if "pretrained_top1" in r else "-"
        lines.append(f"| `{r['command']}` | {pre} | {top1} | {drop} | {r['losses'][0]:.2f} -> {r['losses'][-1]:.2f} "
                     f"| {r['seconds']:.0f} |")
    return "\n".join(lines)


FASHION_BATCH = 64
FASHION_EVAL = 2000


class Resized:
    """The batches of a Fashion-MNIST loader with the gray images repeated to C channels and resized
    (bilinear) to H x W; `generator`, `sampler` and len() are the wrapped loader's (train.fit reseeds them)."""

    def __init__(self, loader, size: tuple[int, ...]):
        self.loader, self.size = loader, tuple(size)
        self.generator, self.sampler = loader.generator, loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch.nn.functional as F

        for x, y in self.loader:
            yield F.interpolate(x.repeat(1, self.size[0], 1, 1), size=self.size[1:], mode="bilinear",
                                align_corners=False), y


def fashion_loaders(size: tuple[int, ...], val_subset: int | None = None) -> tuple[Resized, Resized]:
    """Return (train, test) loaders of normalized Fashion-MNIST for a model of input `size`: batch
    FASHION_BATCH, no augmentation, a fixed shuffle; `val_subset`: a fixed random subset of the test images."""
    import torch

    from irconvert.data import build_data
    from irconvert.recipe import load_recipe
    from bench.accuracy import RECIPE

    cfg = load_recipe(RECIPE, ["data.hflip=0.0", "data.crop_padding=0", f"data.batch_size={FASHION_BATCH}",
                               "data.workers=0", *([f"data.val_subset={val_subset}"] if val_subset else [])]).data
    train, val = build_data(cfg).loaders(cfg, torch.Generator().manual_seed(0))
    return Resized(train, size), Resized(val, size)


def _fashion(split: str, size: tuple[int, ...]):
    """Yield normalized Fashion-MNIST (images, labels) batches of `split`, shaped for a model of input `size`."""
    train, val = fashion_loaders(size)
    yield from (train if split == "train" else val)


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
