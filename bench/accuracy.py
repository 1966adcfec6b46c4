"""IR-Net's ablation on real Fashion-MNIST, through irconvert's own pipeline.

One full-precision timm ResNet-18 (1-channel 28x28 input: stride-2 stem without max-pool, from
recipes/fashion-mnist.yaml) is trained once, to convergence (a cosine schedule to zero, `--fp-epochs`,
the curve checked for a plateau), and cached by a hash of its recipe's model, data and teacher sections (bench/cache/, or the shipped
irconvert/pretrained/ file when the hash is the same: the default 16-32-64-128 network for 12
epochs is exactly that model); every binary variant starts from those same FP weights (conversion
of a trained model is the product) and gets the same budget:

    vanilla W1A1        plain sign + clipped STE, no Libra-PB, no EDE
    + Libra-PB          balanced, standardized weights with the 2^n scale (STE)
    + EDE               the t/k schedule (plain sign weights)
    IR-Net              both
    IR-Net + KD         distillation from the FP model
    IR-Net + KD + structure   Bi-Real shortcut around every binary conv
    IR-Net + KD + gated structure   the same shortcuts, each times a learned gate that starts at 0
    IR-Net W1A32        binary weights, full-precision activations (with KD)

and the other binarizers of the same line of work, with the same budget and no KD (compare with IR-Net):

    SD-BNN              learned per-channel shifts of activations and weights before the sign
    SD-BNN + IR-Net     the shifts on Libra-PB's balanced weights, with EDE
    trained scales      Xu & Cheung's trained weight/activation scaling factors, ApproxSign, L2
    trained scales + IR-Net   trained scales on Libra-PB's balanced weights, with EDE

All W1A1 variants have the converter's default Hardtanh in front of binary convs (without it a
binary conv behind a ReLU sees only +1). Results: bench/results/accuracy.{json,md,png}.

    python -m bench.accuracy                 # the full benchmark (the CORE variants, 2 seeds)
    python -m bench.accuracy --reduced       # one seed, fewer steps
    python -m bench.accuracy --variants "IR-Net + KD" "IR-Net + KD + BN re-estimation" --binary-steps 150
                                             # the training levers against the default
    python -m bench.accuracy --device cuda --jobs 8 --width 32 --fp-epochs 15 --minutes 8 --name accuracy-gpu
                                             # a GPU: runs in parallel processes, and the binary epochs
                                             # are chosen from a timed probe to fit the minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_results
from bench.pretrain import (OUT as SHIPPED, plateaued, save_weights, teacher_key, teacher_recipe, train_teacher,
                            widths)
from irconvert.recipe import load_recipe
from irconvert.run import run

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "fashion-mnist.yaml"
# The rows were measured with each binary layer on the recipe's lr; the recipe's latent_lr 0.07 (chosen by
# bench.zoo_real for the mobile families, 2026-12-02) and its bn_reestimate 20 are pinned back so that they stay
# reproducible
PINNED = ["train.latent_lr=same", "train.bn_reestimate=0"]
CACHE = Path(__file__).resolve().parent / "cache"  # converged FP models by teacher_key (not in git)

VARIANTS = [  # (name, mode, overrides)
    ("vanilla W1A1", "W1A1", ["binarize.method=vanilla", "train.distill.enabled=false"]),
    ("+ Libra-PB", "W1A1", ["binarize.method=libra", "train.distill.enabled=false"]),
    ("+ EDE", "W1A1", ["binarize.method=ede", "train.distill.enabled=false"]),
    ("IR-Net", "W1A1", ["binarize.method=irnet", "train.distill.enabled=false"]),
    ("IR-Net + KD", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true"]),
    ("IR-Net + KD + structure", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true", "binarize.shortcut=true"]),
    ("IR-Net + KD + gated structure", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                               "binarize.shortcut=gated"]),
    ("IR-Net W1A32", "W1A32", ["binarize.method=irnet", "binarize.mode=W1A32", "train.distill.enabled=true"]),
    ("SD-BNN", "W1A1", ["binarize.method=sdbnn", "train.distill.enabled=false"]),
    ("SD-BNN + IR-Net", "W1A1", ["binarize.method=irnet_sd", "train.distill.enabled=false"]),
    ("trained scales", "W1A1", ["binarize.method=scaled", "train.distill.enabled=false"]),
    ("trained scales + IR-Net", "W1A1", ["binarize.method=irnet_scaled", "train.distill.enabled=false"]),
    # the training levers (recipe options), each on IR-Net + KD
    ("IR-Net + KD, previous defaults", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                                "train.lr=0.001", "train.distill.alpha=0.9",
                                                "train.distill.temperature=4.0", "binarize.patterns={}"]),
    ("IR-Net + KD + attention", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                         "train.distill.attention=1000"]),
    ("IR-Net + KD + BN re-estimation", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                                "train.bn_reestimate=100"]),
    ("IR-Net + KD + linear lr", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true", "train.scheduler=linear"]),
    ("IR-Net + KD, two-stage", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true"]),  # see halves()
    ("IR-Net + KD + RSign", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true", "binarize.rsign=true"]),
    ("IR-Net + KD + RSign + RPReLU", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                              "binarize.rsign=true", "binarize.activation=rprelu"]),
    # the two best levers of the 4-epoch table together
    ("IR-Net + KD + RSign + RPReLU + gated", "W1A1", ["binarize.method=irnet", "train.distill.enabled=true",
                                                      "binarize.rsign=true", "binarize.activation=rprelu",
                                                      "binarize.shortcut=gated"]),
]
TWO_STAGE = "IR-Net + KD, two-stage"
# What the full benchmark runs unless --variants names others: the ablation, the recipe's default
# (IR-Net + KD) against the defaults it replaced, and the levers that need longer schedules to show.
CORE = ["vanilla W1A1", "+ Libra-PB", "+ EDE", "IR-Net", "IR-Net + KD", "IR-Net + KD, previous defaults",
        TWO_STAGE, "IR-Net + KD + gated structure", "IR-Net W1A32"]


def halves(binary: list[str]) -> list[str]:
    """Overrides that spend `binary`'s steps as twice the epochs of half the steps, W1A32 in the first half."""
    recipe = load_recipe(RECIPE, [*PINNED, *binary])
    steps = recipe.train.max_steps_per_epoch or -(-(recipe.data.subset or 60000) // recipe.data.batch_size)
    return [f"train.epochs={2 * recipe.train.epochs}", f"train.w1a32_epochs={recipe.train.epochs}",
            f"train.max_steps_per_epoch={max(1, steps // 2)}"]


PROBE = "IR-Net + KD + structure"  # the slowest variant: times the binary epochs under --minutes


def budget(reduced: bool, width: int, binary_epochs: int, binary_steps: int | None) -> dict:
    """The binary training budget: the same for every variant."""
    common = [f"model.kwargs.channels={widths(width)}", "data.subset=null"]
    if reduced:
        return {"seeds": [0], "binary": common + ["train.epochs=1", "train.max_steps_per_epoch=150"]}
    steps = [f"train.max_steps_per_epoch={binary_steps}"] if binary_steps else []
    return {"seeds": [0, 1], "binary": common + [f"train.epochs={binary_epochs}"] + steps}


def converged_fp(width: int, epochs: int, extra: list[str], device: torch.device) -> tuple[Path, dict]:
    """Return the converged FP model's weights file and record, trained once per teacher_key and cached."""
    recipe = teacher_recipe(width, epochs, 0.002, tuple(extra))
    digest = teacher_key(recipe)
    for path in [CACHE / f"fp-{digest}.safetensors", *sorted(SHIPPED.glob("*.safetensors"))]:
        meta_file = path.with_suffix(".json")
        if meta_file.is_file() and (meta := json.loads(meta_file.read_text())).get("teacher_key") == digest:
            print(f"FP model of recipe {digest}: {path} (cached)", flush=True)
            return path, {**meta, "cached": True}
    t0 = time.time()
    model, acc, history = train_teacher(recipe, device)
    meta = {"test_top1": round(acc["top1"], 2), "epochs": epochs, "converged": plateaued(history),
            "minutes": round((time.time() - t0) / 60, 2), "teacher_key": digest, "channels": widths(width),
            "curve": [{k: r[k] for k in ("epoch", "train_loss", "val_top1", "seconds")} for r in history]}
    path = CACHE / f"fp-{digest}.safetensors"
    save_weights(model.cpu(), path, meta)
    return path, {**meta, "cached": False}


def run_variant(name: str, seed: int, fp_file: Path, binary: list[str], work: Path, device: str) -> dict:
    """Convert the FP model with one variant and seed; return its top-1, training curve and minutes."""
    extra = dict((v[0], v[2]) for v in VARIANTS)[name] + (halves(binary) if name == TWO_STAGE else [])
    out = work / f"{name.replace(' ', '_').replace('+', 'p')}-{seed}"
    over = binary + extra + ["teacher.finetune=null", "model.pretrained=false", "output.plot=false",
                             "output.checkpoint=false", "output.export=false", f"train.device={device}"]
    t0 = time.time()
    # overwrite: the folder is the benchmark's own, and one without a result file is an interrupted run
    report = run("resnet18", RECIPE, out=out, weights=str(fp_file), overrides=(*PINNED, *over), seed=seed,
                 overwrite=True, log=lambda *a: None)
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"top1": report["binary"]["top1"], "curve": curve, "minutes": (time.time() - t0) / 60}


def result_file(work: Path, name: str, seed: int, binary: list[str]) -> Path:
    """Return where the run (name, seed) with budget `binary` keeps its result in `work` (one file per budget:
    a rerun with another budget never writes over a finished run's result)."""
    digest = hashlib.sha256(json.dumps(binary).encode()).hexdigest()[:8]
    return work / f"result-{name.replace(' ', '_').replace('+', 'p').replace(',', '')}-{seed}-{digest}.json"


def finished(work: Path, name: str, seed: int, binary: list[str]) -> dict | None:
    """Return the stored result of (name, seed) if an earlier run in `work` had the same budget, else None."""
    new = result_file(work, name, seed, binary)
    old = new.with_name(new.name.rsplit("-", 1)[0] + ".json")  # the name before budgets had their own file
    for path in (new, old):
        if path.is_file() and (out := json.loads(path.read_text())).get("binary") == binary:
            print(f"{name} seed {seed}: top-1 {out['top1']:.2f}% (kept from {path})", flush=True)
            return out
    return None


def run_all(runs: list[tuple[str, int]], fp_file: Path, binary: list[str], work: Path, device: str,
            jobs: int) -> dict[tuple[str, int], dict]:
    """Run (variant, seed) pairs, in this process or in `jobs` parallel worker processes; keep finished ones."""
    work.mkdir(parents=True, exist_ok=True)
    results = {job: out for job in runs if (out := finished(work, *job, binary)) is not None}
    runs = [job for job in runs if job not in results]
    if jobs <= 1:
        for name, seed in runs:
            out = {**run_variant(name, seed, fp_file, binary, work, device), "binary": binary}
            result_file(work, name, seed, binary).write_text(json.dumps(out))
            results[(name, seed)] = out
            print(f"{name} seed {seed}: top-1 {out['top1']:.2f}%", flush=True)
        return results
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 2) // jobs)

    def worker(job: tuple[str, int]) -> dict:
        name, seed = job
        res = result_file(work, name, seed, binary)
        cmd = [sys.executable, "-m", "bench.accuracy", "--worker", name, "--seed", str(seed), "--fp-weights", str(fp_file),
               "--result", str(res), "--device", device, "--work", str(work), "--binary", json.dumps(binary)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(res.read_text())
        print(f"{name} seed {seed}: top-1 {out['top1']:.2f}% ({out['minutes']:.1f} min)", flush=True)
        return out

    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(worker, job): job for job in runs}
        for future, job in futures.items():
            try:
                results[job] = future.result()
            except RuntimeError as exc:  # the other runs go on; their results stay in `work` for --resume
                print(exc, file=sys.stderr, flush=True)
                failed.append(job)
    if failed:
        raise SystemExit(f"{len(failed)} of {len(runs)} runs failed ({', '.join(f'{n} seed {s}' for n, s in failed)}); "
                         f"the others are kept in {work}: fix the cause and rerun with --resume {work}")
    return results


def probe_epochs(minutes: float, n_runs: int, fp_file: Path, binary: list[str], work: Path, device: str,
                 jobs: int, t_start: float) -> int:
    """Return the binary epochs that let n_runs runs finish within `minutes` of t_start, timed on the slowest variant."""
    steps = 60
    over = [o for o in binary if not o.startswith(("train.epochs=", "train.max_steps_per_epoch="))]
    over += ["train.epochs=1", f"train.max_steps_per_epoch={steps}", "data.val_subset=2000"]
    t0 = time.time()
    probe = run_all([(PROBE, 100 + i) for i in range(jobs)], fp_file, over, work / "probe", device, jobs)
    wave = time.time() - t0
    train_s = max(r["curve"][-1]["seconds"] for r in probe.values())  # the epoch's own time, eval included
    startup = max(wave - train_s, 0.0)  # process start, data, teacher: once per run
    recipe = load_recipe(RECIPE, [*PINNED, *binary])
    per_epoch_steps = -(-(recipe.data.subset or 60000) // recipe.data.batch_size)
    # steps train, evaluation batches count about a third of a step each (10k test images vs the probe's 2k)
    per_epoch = train_s * (per_epoch_steps + 10000 / recipe.data.batch_size / 3) / (steps + 2000 / recipe.data.batch_size / 3)
    waves = -(-n_runs // jobs)
    left = minutes * 60 - (time.time() - t_start)
    epochs = max(1, min(30, int((0.9 * left / waves - startup) / per_epoch)))
    print(f"probe: {jobs} x {steps} steps, wave {wave:.1f}s (start-up {startup:.1f}s) -> {per_epoch:.1f}s per epoch, "
          f"{waves} waves, {left / 60:.1f} min left -> {epochs} binary epochs", flush=True)
    return epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reduced", action="store_true", help="one seed, fewer steps (about 15 minutes)")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18's first stage width (16: 16-32-64-128)")
    ap.add_argument("--variants", nargs="*", help="only these variant names")
    ap.add_argument("--fp-epochs", type=int, default=12, help="epochs of the converged FP model (cached)")
    ap.add_argument("--binary-epochs", type=int, default=1, help="epochs of each binary run (full form)")
    ap.add_argument("--binary-steps", type=int, help="steps per epoch of each binary run (default: whole epochs)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--jobs", type=int, default=2,
                    help="binary runs in parallel worker processes (one thread each on a CPU; 1 = in this process)")
    ap.add_argument("--minutes", type=float, help="choose the binary epochs to finish in this time (timed probe)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for the FP and every binary run (e.g. data.batch_size=256)")
    ap.add_argument("--name", default=None, help="result file name (default accuracy / accuracy-reduced)")
    ap.add_argument("--resume", type=Path, metavar="DIR",
                    help="work folder of an interrupted run: its finished (variant, seed) runs with the same budget are kept")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fp-weights", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--binary", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # one (variant, seed) run for run_all
        out = run_variant(args.worker, args.seed, Path(args.fp_weights), json.loads(args.binary), Path(args.work),
                          args.device)
        Path(args.result).write_text(json.dumps({**out, "binary": json.loads(args.binary)}))
        return
    t_start = time.time()
    b = budget(args.reduced, args.width, args.binary_epochs, args.binary_steps)
    b["binary"] += args.set
    torch.manual_seed(0)
    work = args.resume or Path(tempfile.mkdtemp(prefix="irconvert-acc-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder (pass to --resume to keep finished runs): {work}", flush=True)
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    fp_file, fp = converged_fp(args.width, args.fp_epochs, args.set, device)
    print(f"FP: top-1 {fp['test_top1']:.2f}% after {fp['epochs']} epochs (converged: {fp['converged']})", flush=True)
    rows = [{"variant": "FP", "mode": "FP", "top1": [fp["test_top1"]], "top1_mean": fp["test_top1"], "top1_std": 0.0,
             "epochs": fp["epochs"], "converged": fp["converged"], "minutes": fp["minutes"], "cached": fp["cached"]}]
    curves = {"FP": fp["curve"]}
    unknown = set(args.variants or []) - {v[0] for v in VARIANTS}
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; known: {[v[0] for v in VARIANTS]}")
    by_name = {v[0]: v for v in VARIANTS}
    chosen = [by_name[name] for name in dict.fromkeys(args.variants or CORE)]  # runs start in the order given
    runs = [(name, seed) for name, _, _ in chosen for seed in b["seeds"]]

    if args.minutes and not args.reduced:
        epochs = probe_epochs(args.minutes, len(runs), fp_file, b["binary"], work, args.device, args.jobs, t_start)
        b["binary"] = budget(False, args.width, epochs, args.binary_steps)["binary"] + args.set
    results = run_all(runs, fp_file, b["binary"], work, args.device, args.jobs)
    recipe = load_recipe(RECIPE, [*PINNED, *b["binary"]])
    for name, mode, _ in chosen:
        accs = [results[(name, seed)]["top1"] for seed in b["seeds"]]
        curves[name] = results[(name, b["seeds"][0])]["curve"]
        rows.append({"variant": name, "mode": mode, "top1": accs, "top1_mean": round(statistics.mean(accs), 3),
                     "top1_std": round(statistics.stdev(accs), 3) if len(accs) > 1 else 0.0,
                     "epochs": recipe.train.epochs, "steps_per_epoch": recipe.train.max_steps_per_epoch,
                     "minutes": round(sum(results[(name, s)]["minutes"] for s in b["seeds"]), 2),
                     "device": card})
    rows[0]["device"] = card
    fp_top = rows[0]["top1_mean"]
    label = "reduced" if args.reduced else (f"binary epochs {recipe.train.epochs}"
                                            + (f" of {args.binary_steps} steps" if args.binary_steps else ""))
    par = f", {args.jobs} runs in parallel (minutes are each run's own, sharing the device)" if args.jobs > 1 else ""
    fp_how = (f"ResNet-18 {widths(args.width)}, {fp['epochs']} epochs, converged: {fp['converged']}"
              f"{' (cached)' if fp['cached'] else ''}")
    lines = [f"Budget ({label}) on {card}{par}; FP: {fp_how}; every binary variant: "
             f"{' '.join(b['binary'])}; seeds {b['seeds']}; batch {recipe.data.batch_size}; total {(time.time() - t_start) / 60:.1f} min.", "",
             "| variant | mode | top-1 mean (%) | spread (std) | per seed | gap to FP | minutes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mode']} | {r['top1_mean']:.2f} | {r['top1_std']:.2f} | "
                     f"{', '.join(f'{a:.2f}' for a in r['top1'])} | {r['top1_mean'] - fp_top:+.2f} | {r['minutes']:.1f} |")
    name = args.name or ("accuracy-reduced" if args.reduced else "accuracy")
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
