"""The zoo on real data: does a trained model of each family convert to a binary one that keeps its accuracy?

    python -m bench.zoo_real --list fast                       # the 40 deployment models, 2 workers
    python -m bench.zoo_real --only resnet18,mobilenetv2_100   # some of them (merged into the list's table)
    python -m bench.zoo_real --list fast --only 'efficientnet*' --set train.grad_clip=0.01 \\
        --set train.grad_clip_mode=agc --tag agc               # a training option, in its own table
    python -m bench.zoo_real --summary                         # the options table over every tagged run
    python -m bench.zoo_real --list timm --reuse fast          # the timm list; its models the fast run measured
                                                               # under the same settings are taken from there

Per model, in a worker process of bench/zoo.py's pool (per-model timeout, memory cap, restart after a crash):

  1. create it as the zoo sweep does (seed 0, 10 classes, random init; the classifier drawn from
     N(0, 0.01) where it is one Linear or 1x1 conv, torchvision's head init, `zoo_check.small_head`),
     at the smallest input size it runs on from 32x32 up (Fashion-MNIST's gray repeated to its channels);
     a timm model that runs only on its own size as built but takes img_size=32 (ViT, DeiT, LeViT) is
     built for 32x32, as a user fine-tuning it on small images would (the row's `built_for`);
  2. train it (the FP model) for STEPS AdamW steps, lr 1e-3, batch 64 (train.fit, a teacher stage), then
     recompute its BatchNorm statistics over FP_BN_BATCHES training batches;
  3. convert it with the default policy (`binarize` section: Policy's defaults, and any --set
     binarize.X), calibrated on a training batch;
  4. fine-tune the binary model for the same STEPS with the default recipe's train section
     (recipes/fashion-mnist.yaml: AdamW lr 0.003, latent_lr 0.07, EDE, distillation from the FP model, alpha 1,
     T 1, BatchNorm statistics recomputed over 20 batches at the end),
     and any --set train.X; train.epochs E splits the steps into E epochs (w1a32_epochs needs E >= 2);
  5. report FP and binary top-1 on 2,000 test images, the gap, the sign-flip rate (share of binary
     weight signs flipped per log point, a tenth of the steps: its mean and its last value) and seconds.

Writes bench/results/zoo-real-LIST[-TAG].json (the config: policy, train section, steps; and a row per
model) and .md through bench.common.write_results. A run with the same config merges its rows into the
file (a model rerun replaces its row); another config needs its own --tag. A new policy default is the
exception: the stored rows whose model the new policy plans exactly as the old one did (unchanged_rows) stay,
and the run must include every model it plans differently, so a default that touches a few models reruns those.
The JSON's `unrun` names the list's models no row measures yet (a partial run, `--only`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import RESULTS, write_results

STEPS = 300
EVAL = 2000
WITHIN = 5.0  # the issue's goal: binary within 5 points of its FP twin
FP_LEARNED = 20.0  # an FP twin under twice the label prior (10 classes) learned nothing: its row compares nothing
SIDES = (32,)  # tried before zoo_check.input_size's 64, 96, ...
FP_LR = 1e-3
# The FP twin's BatchNorm statistics are recomputed over this many training batches after its 300 steps (the
# plain average under its final weights): the running averages of a short run from random init can be far
# off. Measured: torchvision MobileNetV3-Small/Large (momentum 0.01) and MNASNet (0.0003) scored 9.7-10.6%
# (chance) as trained and 73-80% after; timm RegNetY-002 24.1 -> 79.4, ResNet-18 81.9 -> 83.5, MobileNetV2
# 76.3 -> 76.5. Without it the teacher of those models was broken and their gap meant nothing.
FP_BN_BATCHES = 20


def blank(name: str, source: str) -> dict:
    """The record of one model before (or without) a result."""
    return {"model": name, "source": source, "status": "fail", "stage": "create", "reason": "", "input_size": None,
            "built_for": None, "small_head": None, "binary_layers": None,
            "binary_mac_share": None, "w1a1_mac_share": None, "fp_top1": None, "binary_top1": None, "gap": None,
            "flip_rate_mean": None, "flip_rate_last": None, "flip_rates": None, "binary_loss": None,
            "fp_seconds": None, "binary_seconds": None, "seconds": None}


def real_input_size(model) -> tuple[int, ...]:
    """Return (C, H, W): 32x32 (then zoo_check.input_size's sizes) if the model runs on it in training mode."""
    import torch

    from bench.zoo_check import BATCH, input_size

    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = tuple(cfg.get("input_size", (3, 224, 224)))[0]
    for side in SIDES:
        try:
            with torch.no_grad():
                model.train()(torch.randn(BATCH, c, side, side))
            return (c, side, side)
        except Exception:
            continue
    return input_size(model)


def built_for_small_input(spec: str, size: tuple[int, ...]) -> dict:
    """Return the constructor arguments that build `spec` for 32x32 input where it runs only on a larger size as
    built (timm's ViT, DeiT, LeViT take img_size, as a user fine-tuning them on small images would set): {}
    where it already runs on 32x32 or no such argument makes it."""
    from irconvert.models import split_name

    from bench.zoo_check import sweep_model

    if size[1] <= SIDES[0] or split_name(spec)[0] != "timm":
        return {}
    try:
        if real_input_size(sweep_model(spec, img_size=SIDES[0]))[1] == SIDES[0]:
            return {"img_size": SIDES[0]}
    except Exception:  # no img_size argument, or it does not fit: the model's own size
        pass
    return {}


def train_recipe(overrides: list[str], steps: int):
    """Return the recipe zoo_real trains with: recipes/fashion-mnist.yaml with Policy's default binarize
    section, `steps` binary steps over train.epochs epochs, then `overrides` (--set) applied."""
    from bench.accuracy import RECIPE
    from irconvert.recipe import apply_overrides, load_recipe, validate

    raw = load_recipe(RECIPE).model_dump(mode="json")
    raw["binarize"] = {}  # the default policy, not the ResNet recipe's own
    raw = apply_overrides(raw, ["train.epochs=1", *overrides])
    epochs = raw["train"]["epochs"]
    raw = apply_overrides(raw, [f"train.max_steps_per_epoch={max(1, steps // epochs)}"])
    return validate(raw, "zoo_real --set")


def fp_cache(spec: str, size: tuple[int, ...], steps: int) -> Path:
    """Where the FP twin of `spec` trained for `steps` steps at input `size` is kept between runs: keyed by
    everything its weights depend on (this file's FP settings, the torch and timm versions)."""
    import hashlib

    import timm
    import torch

    key = json.dumps([spec, list(size), steps, FP_LR, EVAL, torch.__version__, timm.__version__])
    from irconvert.native import cache_dir

    return cache_dir() / "zoo-real-fp" / f"{spec.replace(':', '_')}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def mac_shares(student, size) -> dict:
    """The shares of the binary model's conv/linear MACs whose weights are binary (W1A1 or W1A32) and that
    are bitwise (W1A1): a rule that keeps layers real-valued shows what it costs next to the gap it saves."""
    import irconvert

    s = irconvert.summary(student, tuple(size))
    return {"binary_mac_share": round(s.binary_mac_share, 4), "w1a1_mac_share": round(s.w1a1_mac_share, 4)}


def real_model(spec: str, steps: int = STEPS, overrides: list[str] = (), report=lambda stage: None,
               fp_cache_on: bool = False) -> dict:
    """Train, convert and fine-tune model `spec` on Fashion-MNIST; return its record. With `fp_cache_on` the
    trained FP twin is read from (or written to) `fp_cache`, so option runs train each FP model once."""
    import warnings

    import torch

    import irconvert
    from bench.zoo_check import small_head, sweep_model
    from bench.zoo_probe import fashion_loaders
    from irconvert.models import split_name
    from irconvert.recipe import Schedule
    from irconvert.train import Stage, evaluate, fit, reestimate_bn

    source, name = split_name(spec)
    rec = blank(name, source)
    t0 = time.perf_counter()
    stage = "create"
    cpu = torch.device("cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report(stage)
            recipe = train_recipe(list(overrides), steps)
            kwargs = built_for_small_input(spec, real_input_size(sweep_model(spec)))
            size = real_input_size(sweep_model(spec, **kwargs))
            rec["input_size"], rec["built_for"] = list(size), kwargs or None
            model = sweep_model(spec, **kwargs)  # a fresh one: the size probe ran BatchNorms in training mode
            rec["small_head"] = small_head(model)
            train, test = fashion_loaders(size, val_subset=EVAL)

            stage = "fp-train"
            report(stage)
            cached = fp_cache(spec, size, steps) if fp_cache_on else None
            saved = torch.load(cached, weights_only=True) if cached is not None and cached.is_file() else None
            if saved is not None:  # the same FP twin as before: trained once, not per option run
                model.load_state_dict(saved["state_dict"])
                rec["fp_top1"], rec["fp_seconds"], rec["fp_cached"] = saved["fp_top1"], saved["fp_seconds"], True
            else:
                fp = Stage("teacher", model, Schedule(epochs=1, lr=FP_LR, scheduler="none", max_steps_per_epoch=steps), 0)
                fit(fp, train, test, cpu)
                rec["fp_seconds"] = round(time.perf_counter() - t0, 1)
            if saved is None or saved.get("bn_batches") != FP_BN_BATCHES:  # trained now, or cached before the re-estimate
                reestimate_bn(model, fashion_loaders(size)[0], FP_BN_BATCHES, cpu)  # its own loader: the same batches each time
                rec["fp_top1"] = round(evaluate(model, test, cpu)["top1"], 2)
                if cached is not None:
                    from irconvert.write import atomic_path

                    with atomic_path(cached) as tmp:
                        torch.save({"state_dict": model.state_dict(), "fp_top1": rec["fp_top1"],
                                    "fp_seconds": rec["fp_seconds"], "bn_batches": FP_BN_BATCHES}, tmp)

            stage = "convert"
            report(stage)
            model.eval()
            x = next(iter(train))[0]
            student = irconvert.binarize(model, recipe.binarize, calibrate=x)
            rec["binary_layers"] = len(student.irconvert_plan.binary) if hasattr(student, "irconvert_plan") else None
            rec.update(mac_shares(student, size))

            stage = "binary-train"
            report(stage)
            t1 = time.perf_counter()
            r = recipe.train
            binary = Stage("binary", student, r, r.seed, teacher=model, distill=r.distill, ede=r.ede)
            rows = fit(binary, train, test, cpu).history
            points = [p for row in rows for p in row["log"]]
            rates = [p["flip_rate"] for p in points if "flip_rate" in p]
            rec["binary_top1"] = round(rows[-1]["val_top1"], 2)
            rec["gap"] = round(rec["fp_top1"] - rec["binary_top1"], 2)
            rec["flip_rates"] = [round(v, 5) for v in rates]
            rec["flip_rate_mean"] = round(statistics.fmean(rates), 5) if rates else None
            rec["flip_rate_last"] = round(rates[-1], 5) if rates else None
            rec["binary_loss"] = [round(p["train_loss"], 4) for p in points]
            rec["binary_seconds"] = round(time.perf_counter() - t1, 1)
        rec.update(status="ok", stage="", reason="")
    except Exception as exc:
        text = " ".join(str(exc).split()) or ""
        rec.update(stage=stage, reason=f"{type(exc).__name__}: {text}"[:300])
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def plan_signatures(spec: str, built_for: dict | None, *policies: dict, size: tuple[int, ...] | None = None) -> list[tuple]:
    """What each of `policies` decides for `spec` as zoo_real builds it, from its graph (built and analysed once,
    at input `size` as binarize's calibration batch gives it): each layer's mode and gain, the shortcuts, the
    activations replaced. Two policies with the same signature convert the model the same way."""
    import warnings

    import torch

    from bench.zoo_check import sweep_model
    from irconvert.analyze import analyze
    from irconvert.plan import Policy, plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = sweep_model(spec, **(built_for or {}))
        example = (torch.zeros((2, *size)),) if size else None
        analysis, modules = analyze(model, example), dict(model.named_modules())
        plans = [plan(analysis, Policy(**policy), modules) for policy in policies]
    return [(tuple((n, lp.mode, lp.gain) for n, lp in p.layers.items()), p.shortcuts, p.hardtanh) for p in plans]


# Policy fields added after runs were stored, with the default that computes what those runs computed: a stored
# policy without one is filled in, so that the new field alone does not make every stored row look stale.
# (A field whose default changed behaviour, keep_projections, is not one: runs without it ran without it.)
NEUTRAL_POLICY = {"w1a1_min_fan_in": 0}


def read_run(path: Path) -> dict:
    """A stored run, its policy completed with NEUTRAL_POLICY's fields."""
    data = json.loads(path.read_text())
    if isinstance(data.get("config", {}).get("policy"), dict):
        data["config"]["policy"] = {**NEUTRAL_POLICY, **data["config"]["policy"]}
    return data


def _settings(config: dict) -> dict:
    """A run's settings other than its policy: what no stored row can be kept across."""
    return {k: v for k, v in config.items() if k not in ("note", "baseline", "policy", "policy_since")}


def _spec(row: dict) -> str:
    return row["model"] if row["source"] == "timm" else f"{row['source']}:{row['model']}"


def unchanged_rows(old: dict, config: dict) -> tuple[list[dict], list[str]]:
    """Of stored run `old`, the rows still valid under `config`: all of them where the settings are the same;
    where only the policy differs, those whose model both policies plan alike (plan_signatures), so that a new
    policy default reruns only the models it changes. Returns (rows kept, specs to rerun)."""
    if _settings(old["config"]) != _settings(config):
        return [], [_spec(r) for r in old["rows"]]
    if old["config"]["policy"] == config["policy"]:
        return list(old["rows"]), []
    kept, rerun = [], []
    for r in old["rows"]:
        try:
            before, after = plan_signatures(_spec(r), r.get("built_for"), old["config"]["policy"], config["policy"],
                                            size=tuple(r["input_size"]) if r.get("input_size") else None)
            same = before == after
        except Exception:  # the model does not build or trace any more: measure it again
            same = False
        (kept if same else rerun).append(r if same else _spec(r))
    return kept, rerun


def worker_main(config: dict) -> None:
    """Read model specs from stdin, write stage and result lines (JSON) to the original stdout (bench.zoo's protocol)."""
    import torch

    torch.set_num_threads(1)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # models that print must not corrupt the protocol
    for line in sys.stdin:
        spec = line.strip()
        if spec:
            rec = real_model(spec, config["steps"], config["set"],
                             lambda stage: proto.write(json.dumps({"stage": stage}) + "\n"), config.get("fp_cache", True))
            proto.write(json.dumps({"result": rec}) + "\n")


# ---------------------------------------------------------------- tables


def compared(r: dict) -> bool:
    """Whether row `r` measures a conversion: it ran, and its FP twin learned (at least FP_LEARNED top-1). A binary
    twin of an FP model at chance is "within" it by being at chance too."""
    return r["gap"] is not None and (r.get("fp_top1") is None or r["fp_top1"] >= FP_LEARNED)


def within(rows: list[dict]) -> int:
    return sum(compared(r) and r["gap"] <= WITHIN for r in rows)


def median_gap(rows: list[dict]):
    gaps = [r["gap"] for r in rows if compared(r)]
    return round(statistics.median(gaps), 2) if gaps else None


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def final_losses(rows: list[dict]) -> list[float]:
    """The last distillation loss of each model within WITHIN points: what a miss's loss is compared with."""
    return sorted(r["binary_loss"][-1] for r in rows
                  if r["status"] == "ok" and compared(r) and r["gap"] <= WITHIN and r.get("binary_loss"))


def diagnosis(r: dict, within_losses: list[float] = ()) -> str:
    """Return what a miss (gap over WITHIN points, or a failure) measured, in words: its last distillation loss
    (against `within_losses`, those of the models within) and where it went over the last three log points
    (still falling, flat or rising); '' for a model within."""
    if r["status"] != "ok":
        return f"{r['stage']}: {r['reason'][:120]}"
    if r["gap"] is not None and not compared(r):
        return (f"the FP twin did not learn ({r['fp_top1']:.1f}% after its steps, under {FP_LEARNED:g}%): "
                "the row compares nothing and counts as a miss")
    if r["gap"] is None or r["gap"] <= WITHIN:
        return ""
    loss = r.get("binary_loss") or []
    if len(loss) < 4:
        return f"gap {r['gap']:.1f}"
    ref = f" (the models within: {within_losses[0]:.2f}-{within_losses[-1]:.2f})" if within_losses else ""
    fall = 1 - loss[-1] / loss[-4] if loss[-4] else 0.0
    trend = (f"still falling, {fall:.0%} lower than 3 log points before" if fall > 0.05 else
             f"rising at the end, from {loss[-4]:.2f}" if fall < -0.05 else "flat over the last 3 log points")
    return f"distillation loss {loss[-1]:.2f} at the end{ref}, {trend}"


def _run_key(r: dict) -> str | None:
    return json.dumps(r["run"], sort_keys=True) if r.get("run") else None


def run_labels(rows: list[dict]) -> tuple[dict[str, str], list[str]]:
    """Return a letter per run that measured rows of this table (reused rows are the other table's) and the lines
    that say, per run, when, on how many workers and cores, and what else the machine was doing."""
    counts = Counter(_run_key(r) for r in rows if not r.get("reused_from"))  # first-seen order; None: not recorded
    unknown = counts.pop(None, 0)
    labels = {k: chr(ord("a") + i) for i, k in enumerate(counts)}
    text = []
    for k, n in counts.items():
        run = json.loads(k)
        text.append(f"- run {labels[k]} ({n} rows, {run['date']}, {run['jobs']} worker(s) on {run['cores']} cores): "
                    f"{run['note'] or 'what else ran on the machine was not recorded'}")
    if unknown:
        text.append(f"- {unknown} rows from runs made before rows recorded their run's conditions")
    return labels, (text + [""] if text else [])


def since_note(rows: list[dict]) -> str:
    """Say how many of this table's own rows were measured under an earlier policy that plans them the same."""
    n = sum(bool(r.get("earlier_policy")) and not r.get("reused_from") for r in rows)
    return (f"; {n} rows measured under an earlier policy that plans their models identically "
            "(bench.zoo_real.plan_signatures)") if n else ""


def markdown(data: dict) -> str:
    """Return the Markdown of one zoo_real result: the config, the summary, a row per model."""
    c, rows = data["config"], data["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    pol = {k: v for k, v in c["policy"].items() if k in ("mode", "method", "shortcut", "shortcut_width", "keep_first",
                                                          "keep_last", "keep_depthwise", "keep_gates", "keep_projections",
                                                          "features", "gated_input", "w1a1_min_fan_in")}
    tr = c.get("train") or {}
    labels, runs_text = run_labels(rows)
    lines = [f"# zoo_real: {c['list']}{' (' + c['tag'] + ')' if c.get('tag') else ''}", "",
             f"Fashion-MNIST, per model: the FP model trained from random init for {c['steps']} AdamW steps "
             f"(lr {FP_LR:g}, batch 64, at the smallest input size from 32x32 it runs on), converted with the "
             f"policy {json.dumps(pol)} (the whole policy in the JSON), calibrated on a training batch, then "
             f"fine-tuned for {c['steps']} steps with the default recipe's train section"
             f"{' (lr %s, latent_lr %s)' % (tr['lr'], tr.get('latent_lr', 'same')) if 'lr' in tr else ''}"
             f"{' and ' + ', '.join(c['set']) if c['set'] else ''} (distillation from the FP model, EDE). "
             f"Top-1 on {EVAL} test images. flips: share of binary weight signs flipped per log point "
             f"(a tenth of the binary steps), mean over the run / last. {c['note']}"
             f"{'; ' + c['policy_since'] if c.get('policy_since') else ''}{since_note(rows)}", "", *runs_text,
             f"**{within(ok)} of {len(rows)} within {WITHIN:g} points** of their FP twin; median gap "
             f"{_num(median_gap(ok), '.2f')} points; {len(rows) - len(ok)} failed to run."
             + (f" Not run yet: {len(data['unrun'])} of the list's {len(data['unrun']) + len(rows)} models "
                f"({', '.join(data['unrun'])})." if data.get("unrun") else ""), "",
             "| model | source | input | FP top-1 | binary top-1 | gap | flips mean / last | s | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in sorted(rows, key=lambda r: (r["source"], r["model"])):
        size = "x".join(map(str, r["input_size"][1:])) if r["input_size"] else "-"
        note = diagnosis(r, final_losses(rows)).replace("|", "/")
        if r.get("built_for"):
            note = "; ".join(filter(None, ["built with " + ", ".join(f"{k}={v}" for k, v in r["built_for"].items()), note]))
        if r.get("reused_from"):
            note = "; ".join(filter(None, [f"measured in {r['reused_from']}", note]))
        elif label := labels.get(_run_key(r)):
            note = "; ".join(filter(None, [f"run {label}", note]))
        flips = f"{_num(r['flip_rate_mean'], '.2%')} / {_num(r['flip_rate_last'], '.2%')}" if r["flip_rate_mean"] is not None else "-"
        lines.append(f"| {r['model']} | {r['source']} | {size} | {_num(r['fp_top1'], '.1f')} | "
                     f"{_num(r['binary_top1'], '.1f')} | {_num(r['gap'], '.1f')} | {flips} | {_num(r['seconds'], '.0f')} | {note} |")
    return "\n".join(lines)


def settings_diff(config: dict, base: dict) -> str:
    """Return what `config` sets differently from `base` (their policies and train sections), as key=value."""
    out = []
    for section, key in (("policy", "binarize"), ("train", "train")):
        a, b = config.get(section) or {}, base.get(section) or {}
        out += [f"{key}.{k}={json.dumps(a.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return " ".join(out)


def summary(results: Path = RESULTS) -> str:
    """Return the options table: each tagged zoo-real result file against its baseline on the same models (the
    run its config names as `baseline`, else the untagged run of its list); the option is what their settings differ in."""
    runs = {p.stem: read_run(p) for p in sorted(results.glob("zoo-real-*.json")) if p.stem != "zoo-real-options"}
    lines = ["# zoo_real: training options", "",
             "Each tagged run against its baseline on the same models (the run it was measured against: "
             "`--baseline`, else the untagged run, today's defaults): the settings they differ in, median gap "
             f"(FP - binary top-1, points), models within {WITHIN:g} points, mean flip rate per log point, mean share of the MACs that are W1A1 (bitwise; '-' for runs made before "
             "rows recorded it).", "",
             "| run | baseline | option (settings that differ) | models | median gap | baseline median gap | within 5 | "
             "baseline within 5 | mean flips | baseline flips | W1A1 MACs | baseline W1A1 MACs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stem, d in runs.items():
        c = d["config"]
        if not c.get("tag"):
            continue
        bstem = c.get("baseline") or f"zoo-real-{c['list']}"
        base = runs.get(bstem)
        ok = lambda rs: {(r["source"], r["model"]): r for r in rs if r["status"] == "ok"}  # noqa: E731
        mine, theirs = ok(d["rows"]), ok(base["rows"] if base else [])
        if base:  # the models both measured: a run that measured more than its baseline is compared on those
            mine = {k: r for k, r in mine.items() if k in theirs}
        rows, brows = list(mine.values()), [theirs[k] for k in mine if k in theirs]
        option = (settings_diff(c, base["config"]) if base else "") or " ".join(c["set"]) or "(the same settings)"
        flips = lambda rs: _num(statistics.fmean([r["flip_rate_mean"] for r in rs]) if rs else None, ".2%")
        macs = lambda rs: _num(statistics.fmean([r["w1a1_mac_share"] for r in rs])
                               if rs and all(r.get("w1a1_mac_share") is not None for r in rs) else None, ".0%")
        lines.append(f"| {stem} | {bstem if base else '-'} | {option} | {len(rows)} | {_num(median_gap(rows), '.2f')} | "
                     f"{_num(median_gap(brows), '.2f')} | {within(rows)} | {within(brows)} | {flips(rows)} | {flips(brows)} | "
                     f"{macs(rows)} | {macs(brows)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", default="fast", choices=("fast", "timm", "torchvision"))
    ap.add_argument("--only", help="globs on model names, comma-separated, e.g. 'resnet18,mobilenetv2_100'; an exact name outside the list runs too")
    ap.add_argument("--limit", type=int, help="only the first N models of the list")
    ap.add_argument("--steps", type=int, default=STEPS, help="FP and binary training steps (batch 64)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override, e.g. train.grad_clip=0.01 or binarize.shortcut=true")
    ap.add_argument("--tag", help="write zoo-real-LIST-TAG.* (a run with other settings than the defaults)")
    ap.add_argument("--baseline", metavar="TAG",
                    help="the tagged run this one is measured against in --summary (default: the untagged run)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (at most 2 on a 2-core machine)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model (per 100M parameters above that)")
    ap.add_argument("--mem-gib", type=float, default=18, help="a worker over this resident memory is killed (0: no cap)")
    ap.add_argument("--param-budget", type=float, default=450e6,
                    help="models run side by side only while their parameters add up to at most this")
    ap.add_argument("--fresh-fp", action="store_true",
                    help="train every FP twin anew instead of reading it from the cache (~/.cache/irconvert/zoo-real-fp)")
    ap.add_argument("--note", default="", help="a sentence for the table, e.g. what else ran on the machine")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--summary", action="store_true", help="write zoo-real-options.md from the result files")
    ap.add_argument("--adopt", metavar="TAG",
                    help="take the rows of the run tagged TAG into this table without running, where its settings "
                         "(policy, train section, steps) are the ones this table is for: an option made a default")
    ap.add_argument("--reuse", metavar="LIST",
                    help="take the rows of this list's models that the untagged LIST table (e.g. fast) measured under "
                         "this table's settings (steps, policy, train section) instead of running them again")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(json.loads(args.worker))
    if args.summary:
        text = summary(args.out)
        write_results("zoo-real-options", {"table": text}, text, results=args.out)
        return
    from bench import zoo

    try:
        recipe = train_recipe(args.set, args.steps)
    except Exception as exc:  # an IRConvertError naming the bad --set
        ap.error(str(exc))
    specs, families = zoo.select(args.list, args.only, args.limit)
    if not specs:
        ap.error(f"--only {args.only!r} matches no model of the {args.list} list")
    name = f"zoo-real-{args.list}" + (f"-{args.tag}" if args.tag else "")
    config = {"list": args.list, "tag": args.tag, "steps": args.steps, "set": args.set,
              **({"baseline": f"zoo-real-{args.list}-{args.baseline}"} if args.baseline else {}),
              "policy": recipe.binarize.model_dump(mode="json"), "train": recipe.train.model_dump(mode="json")}
    path = args.out / f"{name}.json"
    old = read_run(path) if path.is_file() else None
    if old is not None and _settings(old["config"]) != _settings(config):
        ap.error(f"{path} holds a run with other settings; pass --tag NAME for these, or delete the file")
    stored, rerun = unchanged_rows(old, config) if old is not None else ([], [])
    adopted = []
    if args.adopt:
        src = args.out / f"zoo-real-{args.list}-{args.adopt}.json"
        if not src.is_file():
            ap.error(f"--adopt {args.adopt}: {src} does not exist")
        tagged = read_run(src)
        keys = ("list", "steps", "policy", "train")
        differ = [k for k in keys if tagged["config"].get(k) != config[k]]
        if differ:
            ap.error(f"--adopt {args.adopt}: {src.name} was measured under other settings than this table's "
                     f"(its {', '.join(differ)}); only a run under today's defaults can be adopted")
        adopted = [dict(r, adopted_from=args.adopt) for r in tagged["rows"]]
        specs = [(_spec(r), [args.list]) for r in adopted]
    reused = []
    if args.reuse:
        src = args.out / f"zoo-real-{args.reuse}.json"
        if args.reuse == args.list or not src.is_file():
            ap.error(f"--reuse {args.reuse}: {src} does not exist or is this table; name another list's run")
        other = read_run(src)
        differ = [k for k in ("steps", "set", "policy", "train") if other["config"].get(k) != config[k]]
        if differ:
            ap.error(f"--reuse {args.reuse}: {src.name} was measured under other settings than this table's "
                     f"(its {', '.join(differ)}); only rows made under these settings can be reused")
        wanted = {s for s, _ in specs}
        reused = [dict(r, lists=[args.list], reused_from=src.name) for r in other["rows"] if _spec(r) in wanted]
        done = {_spec(r) for r in reused}
        stored = [r for r in stored if _spec(r) not in done] + reused
        specs = [(s, lists) for s, lists in specs if s not in done]
    missing = [spec for spec in rerun if spec not in {s for s, _ in specs} | {_spec(r) for r in reused}]
    if missing:
        ap.error(f"{path} holds a run with other settings, under which {len(missing)} of its models would convert "
                 f"differently ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); rerun them too "
                 "(--only), pass --tag NAME for these settings, or delete the file")
    if not args.adopt:
        print(f"{len(specs)} models, {args.jobs} worker(s), {args.steps} steps each", file=sys.stderr)
    t0 = time.perf_counter()
    run = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(), "jobs": args.jobs, "note": args.note}
    worker_args = (json.dumps({"steps": args.steps, "set": args.set, "fp_cache": not args.fresh_fp}),)

    whole = [s for s, _ in zoo.select(args.list, None, None)[0]]

    def write(rows: list[dict]) -> None:
        done = {(r["source"], r["model"]) for r in rows}
        kept = [r for r in stored if (r["source"], r["model"]) not in done]
        measured = {_spec(r) for r in kept + rows}
        if args.adopt:  # no run: the table's note stays, and says where the adopted rows come from
            names = ", ".join(r["model"] for r in rows)
            note = "; ".join(filter(None, [old["config"].get("note", "") if old else "", args.note,
                                           f"the rows of {names} come from the run tagged {args.adopt} "
                                           "(zoo-real-{list}-{tag}.json), made under these settings".format(
                                               list=args.list, tag=args.adopt)]))
        elif not specs:  # every model reused, none run: the table's note stays
            note = "; ".join(filter(None, [old["config"].get("note", "") if old else "", args.note]))
        else:
            note = (f"{args.jobs} worker(s) on {os.cpu_count()} CPU cores, last run {time.perf_counter() - t0:.0f} s "
                    "wall" + (f"; {args.note}" if args.note else ""))
        if reused:
            theirs = other["config"].get("policy_since") or since_note(other["rows"]).removeprefix("; ")
            note += (f"; the rows of {', '.join(r['model'] for r in reused)} come from {src.name}, measured there under "
                     "these settings" + (f" ({src.name}: {theirs})" if theirs else ""))
        if old is not None and old["config"]["policy"] != config["policy"]:
            kept = [dict(r, earlier_policy=True) for r in kept]
        if specs and not args.adopt:  # what the machine was doing stays with each row this run measured
            rows = [dict(r, run=r.get("run") or run) for r in rows]
        data = {"config": dict(config, note=note), "rows": kept + rows,
                "unrun": [s for s in whole if s not in measured]}
        write_results(name, data, markdown(data), results=args.out, quiet=len(rows) < len(specs))

    if args.adopt or not specs:  # nothing to run: every selected model was adopted or reused
        return write(adopted)
    rows = zoo.sweep(specs, args.jobs, args.timeout, args.mem_gib, families, args.param_budget,
                     make_worker=lambda: zoo.Worker(args.mem_gib, "bench.zoo_real", worker_args, blank), on_result=write)
    write(rows)

if __name__ == "__main__":
    main()
