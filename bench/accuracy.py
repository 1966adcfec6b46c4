"""IR-Net's ablation on real Fashion-MNIST, through irconvert's own pipeline.

One full-precision timm ResNet-18 (1-channel 28x28 input: stride-2 stem without max-pool, from
recipes/fashion-mnist.yaml) is trained once; every binary variant starts from those same FP
weights (conversion of a trained model is the product) and gets the same budget:

    vanilla W1A1        plain sign + clipped STE, no Libra-PB, no EDE
    + Libra-PB          balanced, standardized weights with the 2^n scale (STE)
    + EDE               the t/k schedule (plain sign weights)
    IR-Net              both
    IR-Net + KD         distillation from the FP model
    IR-Net + KD + structure   Bi-Real shortcut around every binary conv
    IR-Net W1A32        binary weights, full-precision activations (with KD)

All W1A1 variants have the converter's default Hardtanh in front of binary convs (without it a
binary conv behind a ReLU sees only +1). Results: bench/results/accuracy.{json,md,png}.

    python bench/accuracy.py                 # the full benchmark (about 45 minutes on 2 quiet cores)
    python bench/accuracy.py --reduced       # one seed, fewer steps (about 15 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from irconvert.convert import build_model, convert  # noqa: E402
from irconvert.data import build_data  # noqa: E402
from irconvert.recipe import load_recipe  # noqa: E402
from irconvert.train import Stage, evaluate, fit  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion-mnist.yaml"

VARIANTS = [  # (name, mode, overrides)
    ("vanilla W1A1", "W1A1", ["binarize.method=vanilla", "train.distill.enabled=false"]),
    ("+ Libra-PB", "W1A1", ["binarize.method=libra", "train.distill.enabled=false"]),
    ("+ EDE", "W1A1", ["binarize.method=ede", "train.distill.enabled=false"]),
    ("IR-Net", "W1A1", ["binarize.method=irnet", "train.distill.enabled=false"]),
    ("IR-Net + KD", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true"]),
    ("IR-Net + KD + structure", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true", "binarize.shortcut=true"]),
    ("IR-Net W1A32", "W1A32", ["binarize.method=irnet", "binarize.mode=W1A32", "train.distill.enabled=true"]),
]


def budget(reduced: bool, width: str, fp_epochs: int, binary_steps: int | None) -> dict:
    """The training budget: the same for every binary variant."""
    common = [f"model.kwargs.channels={width}", "data.subset=null"]
    if reduced:
        return {"seeds": [0], "fp": common + ["teacher.finetune.epochs=1", "teacher.finetune.max_steps_per_epoch=300"],
                "binary": common + ["train.epochs=1", "train.max_steps_per_epoch=200"]}
    steps = [f"train.max_steps_per_epoch={binary_steps}"] if binary_steps else []
    return {"seeds": [0, 1], "fp": common + [f"teacher.finetune.epochs={fp_epochs}"],
            "binary": common + ["train.epochs=1"] + steps}


def train_fp(overrides: list[str], out: Path) -> tuple[Path, dict, list[dict], float]:
    """Train the FP model once with the recipe's teacher schedule; return its weights file and accuracy."""
    from safetensors.torch import save_file

    recipe = load_recipe(RECIPE, overrides)
    t0 = time.time()
    data = build_data(recipe.data)
    torch.manual_seed(0)
    model = build_model(recipe, data)
    train_loader, val_loader = data.loaders(recipe.data, torch.Generator())
    stage = fit(Stage("teacher", model, recipe.teacher.finetune, 0), train_loader, val_loader, torch.device("cpu"))
    acc = evaluate(model, val_loader, torch.device("cpu"))
    path = out / "fp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, acc, stage.history, (time.time() - t0) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="one seed, fewer steps (about 15 minutes)")
    ap.add_argument("--width", default="[32,64,128,256]", help="ResNet-18 stage widths (timm 'channels' kwarg)")
    ap.add_argument("--variants", nargs="*", help="only these variant names")
    ap.add_argument("--fp-epochs", type=int, default=3, help="epochs of the FP model (full form)")
    ap.add_argument("--binary-steps", type=int, help="steps of each binary run (full form: one whole epoch)")
    args = ap.parse_args()
    b = budget(args.reduced, args.width, args.fp_epochs, args.binary_steps)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="irconvert-acc-"))
    print(f"training the FP model ({' '.join(b['fp'])})", flush=True)
    fp_file, fp_acc, fp_hist, fp_min = train_fp(b["fp"], work)
    fp_epochs = load_recipe(RECIPE, b["fp"]).teacher.finetune.epochs
    rows = [{"variant": "FP", "mode": "FP", "top1": [fp_acc["top1"]], "top1_mean": fp_acc["top1"], "top1_std": 0.0,
             "epochs": fp_epochs, "minutes": round(fp_min, 2)}]
    curves = {"FP": fp_hist}
    for name, mode, extra in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        accs, t0 = [], time.time()
        for seed in b["seeds"]:
            out = work / f"{name.replace(' ', '_').replace('+', 'p')}-{seed}"
            over = b["binary"] + extra + ["teacher.finetune=null", "model.pretrained=false", "output.plot=false",
                                          "output.checkpoint=false", "output.export=false"]
            report = convert("resnet18", RECIPE, out=out, weights=str(fp_file), overrides=tuple(over), seed=seed,
                             log=lambda *a: None)
            accs.append(report["binary"]["top1"])
            if seed == b["seeds"][0]:
                curves[name] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
            print(f"{name} seed {seed}: top-1 {accs[-1]:.2f}%", flush=True)
        recipe = load_recipe(RECIPE, b["binary"])
        rows.append({"variant": name, "mode": mode, "top1": accs, "top1_mean": round(statistics.mean(accs), 3),
                     "top1_std": round(statistics.stdev(accs), 3) if len(accs) > 1 else 0.0,
                     "epochs": recipe.train.epochs, "steps_per_epoch": recipe.train.max_steps_per_epoch,
                     "minutes": round((time.time() - t0) / 60, 2)})
    fp_top = rows[0]["top1_mean"]
    label = "reduced" if args.reduced else f"--fp-epochs {args.fp_epochs} --binary-steps {args.binary_steps or 'one epoch'}"
    lines = [f"Budget ({label}); FP: {' '.join(b['fp'])}; every binary variant: "
             f"{' '.join(b['binary'])}; seeds {b['seeds']}; batch 128; 2 CPU cores.", "",
             "| variant | mode | top-1 mean (%) | spread (std) | per seed | gap to FP | minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['top1_mean']:.2f} | {r['top1_std']:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in r['top1'])} | {r['top1_mean'] - fp_top:+.2f} | {r['minutes']:.1f} |")
    name = "accuracy-reduced" if args.reduced else "accuracy"
    write_results(name, rows, "\n".join(lines))
    plot(rows, curves, RESULTS / f"{name}.png")


def plot(rows: list[dict], curves: dict, path: Path) -> None:
    """Bars of top-1 per variant with the seed spread; val top-1 per epoch of FP and the best binary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = [r["variant"] for r in rows]
    a1.bar(range(len(rows)), [r["top1_mean"] for r in rows], yerr=[r["top1_std"] for r in rows], capsize=4,
           color=["#555"] + ["#3b7dd8" if r["mode"] == "W1A1" else "#e08a2c" for r in rows[1:]])
    for i, r in enumerate(rows):
        a1.scatter([i] * len(r["top1"]), r["top1"], color="k", s=10, zorder=3)
    lo = min(min(r["top1"]) for r in rows)
    a1.set_ylim(max(0, lo - 5), 100)
    a1.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    a1.set_ylabel("top-1 (%)")
    a1.set_title("Fashion-MNIST test top-1 (bars: mean, dots: seeds)")
    best = max((r for r in rows[1:] if r["mode"] == "W1A1"), key=lambda r: r["top1_mean"], default=None)
    for label in ["FP"] + ([best["variant"]] if best else []):
        hist = [h for h in curves.get(label, []) if label == "FP" or h["stage"] == "binary"]
        a2.plot(range(1, len(hist) + 1), [h["val_top1"] for h in hist], marker="o", label=label)
    a2.set(xlabel="epoch", ylabel="val top-1 (%)", title="training curves")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
