"""Model-zoo sweep: every timm family and every torchvision classifier is created (random init,
10 classes), binarized with the default policy (calibrated on the sweep's batch), checked for live
binary inputs, a gradient norm within 100x the FP model's and a loss that 20 AdamW steps lower by 10%,
exported to packed.safetensors, rebuilt from that file alone and compared with the trained model in
eval mode. The per-model check is bench/zoo_check.py.

    python -m bench.zoo                       # all lists, 2 workers
    python -m bench.zoo --list fast --jobs 1  # the 40 deployment models
    python -m bench.zoo --list timm --only 'vit*' --limit 5

Each model runs in a worker process with a per-model timeout; a crash or hang costs that model only
(the worker is restarted). Writes bench/results/zoo.json (one object per model) and zoo.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import zoo_lists
from bench.zoo_check import (ADAMW_STEPS, BATCH, LAST_STEPS, MAX_GRAD_RATIO, MIN_LOSS_DROP, TOLERANCE, _record,
                             at_label_prior, check_model, label_prior_loss)

HERE = Path(__file__).resolve().parent


def worker_main() -> None:
    """Read model specs from stdin, write stage and result lines (JSON) to the original stdout."""
    import torch

    torch.set_num_threads(1)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # models that print must not corrupt the protocol
    for line in sys.stdin:
        spec = line.strip()
        if not spec:
            continue
        rec = check_model(spec, lambda stage: proto.write(json.dumps({"stage": stage}) + "\n"))
        proto.write(json.dumps({"result": rec}) + "\n")


# ---------------------------------------------------------------- the sweep (parent process)


class Worker:
    """A worker process fed one model at a time; restarted after a crash, a timeout or too much memory."""

    def __init__(self, mem_gib: float, module: str = "bench.zoo", args: tuple[str, ...] = (), blank=_record):
        self.mem_gib = mem_gib
        self.proc = None
        self.module, self.args = module, tuple(args)  # the worker: `python -m MODULE --worker *ARGS`
        self.blank = blank  # blank(name, source): the record of a model whose worker died

    def _start(self) -> None:
        # the checkout this script is in, not whichever irconvert is installed
        path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path)
        self.proc = subprocess.Popen([sys.executable, "-m", self.module, "--worker", *self.args], cwd=str(HERE.parent),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, env=env)
        self.lines: queue.Queue = queue.Queue()
        proc = self.proc

        def pump():
            for line in proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def _rss_gib(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            return kib / 2**20
        except (OSError, StopIteration, ValueError):
            return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def run(self, spec: str, timeout: float) -> dict:
        """Return the result record of `spec`, or a failure record if the worker dies, hangs or
        goes over the memory cap (it is killed then, so that it cannot take the machine down)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        from irconvert.models import split_name

        source, name = split_name(spec)
        stage, t0 = "create", time.perf_counter()
        self.proc.stdin.write(spec + "\n")
        self.proc.stdin.flush()
        while True:
            reason = None
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                code = self.proc.poll()
                reason = f"worker died (exit code {code}{', signal %d' % -code if code and code < 0 else ''})"
            elif not line:
                if time.perf_counter() - t0 > timeout:
                    reason = f"timeout: no result after {timeout:.0f} s"
                elif self.mem_gib > 0 and self._rss_gib() > self.mem_gib:
                    reason = f"over the memory cap of {self.mem_gib:g} GiB"
                else:
                    continue
            else:
                msg = json.loads(line)
                if "result" in msg:
                    return msg["result"]
                stage = msg["stage"]
                continue
            self.stop()
            return dict(self.blank(name, source), stage=stage, reason=reason, seconds=round(time.perf_counter() - t0, 2))


def select(which: str, only: str | None, limit: int | None) -> tuple[list[tuple[str, list[str]]], dict]:
    """Return ([(spec, [lists it belongs to])], timm family table) for the chosen lists."""
    lists: dict[str, list[str]] = {}
    families: dict = {}
    if which in ("fast", "all"):
        lists["fast"] = list(zoo_lists.FAST)
    if which in ("timm", "all"):
        families = _families()
        lists["timm"] = [f["model"] for f in families.values() if f["model"]]
    if which in ("torchvision", "all"):
        lists["torchvision"] = zoo_lists.torchvision_names()
    member: dict[str, list[str]] = {}
    for lst, specs in lists.items():
        if only:
            pats = only.split(",")
            specs = [s for s in specs if any(fnmatch.fnmatch(s.rpartition(":")[2], p) or fnmatch.fnmatch(s, p) for p in pats)]
        for s in specs[:limit] if limit else specs:
            member.setdefault(s, []).append(lst)
    short = {s.rpartition(":")[2] for s in member}  # torchvision:resnet18 is what "resnet18" selected there
    for name in (only or "").split(","):  # an exact name no list holds runs too, under the chosen list's name
        if name and not any(c in name for c in "*?[") and name not in member and name not in short and _known(name):
            member[name] = [which]
    return list(member.items()), families


def _known(spec: str) -> bool:
    from irconvert.errors import IRConvertError
    from irconvert.models import check_name

    try:
        check_name(spec)
    except IRConvertError:
        return False
    return True


def _families() -> dict:
    """The timm family table, cached per timm version (building ~1000 models on meta takes 1-2 min)."""
    import timm

    cache = HERE / "results" / "timm_families.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("timm") == timm.__version__ and data.get("max_params") == zoo_lists.MAX_PARAMS:
            return data["families"]
    families = zoo_lists.timm_families()
    _write(cache, json.dumps({"timm": timm.__version__, "max_params": zoo_lists.MAX_PARAMS,
                              "families": families}, indent=1) + "\n")
    return families


def _write(path: Path, text: str) -> None:
    from irconvert.write import write_text

    write_text(path, text)


def estimate_params(spec: str, families: dict) -> int:
    """Return the parameter count of `spec` without building it for real (for scheduling only)."""
    import timm
    import torchvision

    from irconvert.models import split_name

    source, name = split_name(spec)
    if source == "torchvision":
        try:
            return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except Exception:
            return 0
    for f in families.values():
        if f["model"] == name and f["params"]:
            return int(f["params"])
    return (zoo_lists._params_on_meta(name) or 0) if timm.is_model(name) else 0


def sweep(specs: list[tuple[str, list[str]]], jobs: int, timeout: float, mem_gib: float,
          families: dict, param_budget: float, make_worker=None, on_result=None) -> list[dict]:
    """Run every spec on `jobs` workers, largest first; return the records in the order of `specs`.
    `make_worker()` returns a Worker (default: this sweep's, `Worker(mem_gib)`); `on_result(records so
    far)` is called after each model (a long sweep keeps what it has if it is stopped).

    Models run side by side only while their parameters add up to at most `param_budget` (a model
    takes ~25 bytes per parameter at its peak: weights, gradients, binarized copies, the rebuilt
    model), so that two large ones never share the machine's memory. The timeout grows with size.
    """
    params = [estimate_params(spec, families) for spec, _ in specs]
    todo = sorted(range(len(specs)), key=lambda i: -params[i])
    results: list = [None] * len(specs)
    running = [0]
    cond = threading.Condition()
    done = [0]

    def take():
        with cond:
            while todo:
                for k, i in enumerate(todo):
                    if running[0] == 0 or running[0] + params[i] <= param_budget:
                        todo.pop(k)
                        running[0] += params[i]
                        return i
                cond.wait()
            return None

    def slot():
        w = make_worker() if make_worker else Worker(mem_gib)
        try:
            while (i := take()) is not None:
                spec = specs[i][0]
                rec = w.run(spec, timeout * max(1.0, params[i] / 100e6))
                if params[i] > 100e6:
                    w.stop()  # the allocator keeps a big model's pages: a fresh worker gives them back
                rec["lists"] = specs[i][1]
                rec["params"] = params[i]
                results[i] = rec
                with cond:
                    running[0] -= params[i]
                    cond.notify_all()
                    done[0] += 1
                    if on_result is not None:
                        on_result([r for r in results if r is not None])
                    tail = f"  {rec['stage']}: {rec['reason'][:100]}" if rec["status"] != "ok" else ""
                    print(f"[{done[0]}/{len(specs)}] {rec['status']:<4} {spec} {rec['seconds']:.1f}s{tail}",
                          file=sys.stderr, flush=True)
        finally:
            w.stop()

    threads = [threading.Thread(target=slot) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def markdown(results: list[dict], families: dict, wall: float, jobs: int, peers: dict | None = None) -> str:
    """Return the summary table: pass counts per list, then every failure with its stage and reason."""
    import timm
    import torch
    import torchvision

    lines = ["# Model-zoo sweep", "",
             f"timm {timm.__version__}, torchvision {torchvision.__version__}, torch {torch.__version__}; "
             f"random init, 10 classes, default policy (W1A1 IR-Net, first/last/depthwise kept), calibrated on the "
             f"sweep's batch ({BATCH} random normal images, fixed random labels). A model passes if every W1A1 input "
             f"has live bits, its gradient norm is at most {MAX_GRAD_RATIO:g}x the FP model's on the same batch, "
             f"{ADAMW_STEPS} AdamW steps (lr 1e-3) on that batch, dropout and drop-path off, lower the loss (the mean "
             f"of the last {LAST_STEPS} against the first) by at least {100 * MIN_LOSS_DROP:g}%, "
             f"and packed.safetensors, rebuilt without the architecture passed in, gives eval outputs within "
             f"{TOLERANCE:g}. "
             f"Sweep wall time {wall / 60:.1f} min with {jobs} worker(s) on {os.cpu_count()} CPU cores.", "",
             "| list | models | pass | fail | pass rate |", "|---|---:|---:|---:|---:|"]
    names = sorted({lst for r in results for lst in r["lists"]}, key=["timm", "torchvision", "fast"].index)
    for lst in names:
        rs = [r for r in results if lst in r["lists"]]
        ok = sum(r["status"] == "ok" for r in rs)
        label = {"timm": "timm families", "torchvision": "torchvision classifiers", "fast": "fast (deployment 40)"}[lst]
        lines.append(f"| {label} | {len(rs)} | {ok} | {len(rs) - ok} | {100 * ok / max(len(rs), 1):.1f}% |")
    if peers:
        fast = [r for r in results if "fast" in r["lists"]]
        lines += ["", "## Peers on the fast list", "",
                  "bench/zoo_peers.py: the same stages with each tool's own API (binary weights and activations, "
                  "first and last layer full precision); their export is the state_dict, as none has a whole-model "
                  "1-bit file to call the same way.", "",
                  "| tool | models | pass | pass rate | trainable parameters of resnet18 | failures by stage |",
                  "|---|---:|---:|---:|---:|---|"]
        if fast:
            ok = sum(r["status"] == "ok" for r in fast)
            lines.append(f"| irconvert | {len(fast)} | {ok} | {100 * ok / len(fast):.1f}% | all (latent weights) | "
                         f"{_by_stage([r for r in fast if r['status'] != 'ok'])} |")
        for tool, per_list in peers.items():
            for lst, (n, ok) in per_list.items():
                detail = HERE / "results" / f"zoo_peers_{tool}.json"
                recs = json.loads(detail.read_text()) if detail.is_file() else []
                fails = [r for r in recs if r["status"] != "ok"]
                r18 = next((r.get("trainable") for r in recs if r["model"] == "resnet18"), None)
                lines.append(f"| {tool} | {n} | {ok} | {100 * ok / max(n, 1):.1f}% | "
                             f"{f'{r18 / 1e6:.2f}M' if r18 else '?'} | {_by_stage(fails)} |")
        lines += ["", "A tool whose binary layers hold no trainable weight (packed, inference only) passes the train "
                  "stage on its full-precision remainder alone: compare its trainable parameters with resnet18's 11.2M."]
    fails = [r for r in results if r["status"] != "ok"]
    lines += ["", f"## Failures ({len(fails)})", ""]
    if fails:
        lines += ["| model | source | stage | reason |", "|---|---|---|---|"]
        for r in fails:
            lines.append(f"| {r['model']} | {r['source']} | {r['stage']} | {r['reason'].replace('|', '/')[:200]} |")
    else:
        lines.append("None.")
    ok = [r for r in results if r["status"] == "ok"]
    if ok:
        med = sorted(r["size_ratio"] for r in ok)[len(ok) // 2]
        share = sorted(r["binary_mac_share"] for r in ok)[len(ok) // 2]
        untraced = [r["model"] for r in ok if r["traced"] is False]
        w1a32 = [r["model"] for r in ok if r.get("w1a32_layers")]
        norms = sorted((r["grad_ratio"], r["model"]) for r in ok if r.get("grad_ratio") is not None)
        slow = sorted(ok, key=lambda r: -r["seconds"])[:5]
        prior = [f"{r['model']} ({r['loss_last']:.3f} vs {label_prior_loss(r['input_size']):.3f})"
                 for r in ok if at_label_prior(r)]
        lines += ["", "## Passing models", "",
                  f"Median packed/latent size ratio {med:.3f}; median binary share of MACs {100 * share:.1f}%. "
                  f"{len(untraced)} converted through the module-order fallback because torch.fx cannot trace "
                  f"them: {', '.join(untraced) or 'none'}. "
                  f"{len(w1a32)} have W1A32 layers under the W1A1 policy (a weight read outside its layer's forward, "
                  f"as in BEiT's and nn.MultiheadAttention's projections, a layer fed by a functional relu, "
                  f"or the classifier's feature layer, binarize.features). "
                  + (f"Gradient norm over the FP model's: median {norms[len(norms) // 2][0]:.3g}, largest "
                     + ", ".join(f"{n:.3g} ({m})" for n, m in norms[:-4:-1]) + ". " if norms else "")
                  + f"{len(prior)} pass at the label prior (their loss stops, flat, within 3% of the entropy of the "
                  f"batch's labels, what predicting the label frequencies gives: the classifier learned them, the "
                  f"features do not yet tell the images apart): {', '.join(prior) or 'none'}. "
                  + "Slowest: " + ", ".join(f"{r['model']} {r['seconds']:.0f} s" for r in slow) + "."]
    lines += ["", "## Every model", "",
              "live: the smallest share of the minority sign among the W1A1 inputs (calibrated); grad: gradient "
              f"norm / the FP model's; drop: loss decrease over the AdamW steps (mean of the last {LAST_STEPS}); W1A32: layers made W1A32 "
              "(weight read outside the layer, functional relu, dead input bits).", "",
              "| model | source | pass | live | grad | drop | W1A32 | s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r["source"], r["model"])):
        lines.append(f"| {r['model']} | {r['source']} | {'yes' if r['status'] == 'ok' else r['stage']} | "
                     f"{_num(r.get('live_min'), '.3f')} | {_num(r.get('grad_ratio'), '.3g')} | "
                     f"{_num(r.get('loss_drop'), '.0%')} | {_num(r.get('w1a32_layers'), 'd')} | {_num(r.get('seconds'), '.0f')} |")
    if families:
        swapped = {f: v for f, v in families.items() if v["model"] != v["first"]}
        missing = {f: v for f, v in families.items() if not v["model"]}
        lines += ["", "## timm family representatives", "",
                  f"{len(families)} families (the module defining the model). Each is represented by its first "
                  f"model in timm.list_models(), or by its smallest variant when the first has more than "
                  f"{zoo_lists.MAX_PARAMS / 1e6:.0f}M parameters ({len(swapped)} families):", ""]
        lines += [f"- {f}: {v['model']} instead of {v['first']}" for f, v in swapped.items()]
        lines += ["", "Families excluded (no member can be built on this machine): "
                  + (", ".join(f"{f} ({v['why']})" for f, v in missing.items()) or "none") + "."]
    return "\n".join(lines) + "\n"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _by_stage(fails: list[dict]) -> str:
    """Return 'train 3 (RuntimeError: ...), reload 1 (...)': failure counts per stage, with the commonest reason."""
    out = []
    for stage in sorted({r["stage"] for r in fails}):
        rs = [r["reason"] for r in fails if r["stage"] == stage]
        common = max(set(rs), key=rs.count).replace("|", "/")[:70]
        out.append(f"{stage} {len(rs)} ({common})")
    return "; ".join(out) or "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", default="all", choices=("timm", "torchvision", "fast", "all"))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (at most 2 on a 2-core machine)")
    ap.add_argument("--limit", type=int, help="only the first N models of each list")
    ap.add_argument("--only", help="globs on model names, comma-separated, e.g. 'resnet*,vit_*'; an exact name outside the list runs too")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per model (per 100M parameters above that)")
    ap.add_argument("--mem-gib", type=float, default=18, help="a worker over this resident memory is killed (0: no cap)")
    ap.add_argument("--param-budget", type=float, default=450e6,
                    help="models run side by side only while their parameters add up to at most this")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--md-only", action="store_true",
                    help="rewrite zoo.md from zoo.json and zoo_peers.json (after bench/zoo_peers.py) without running")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main()
    if args.md_only:
        results = json.loads((args.out / "zoo.json").read_text())
        run = json.loads((args.out / "zoo_run.json").read_text())
        families = _families() if any("timm" in r["lists"] for r in results) else {}
    else:
        t0 = time.perf_counter()
        specs, families = select(args.list, args.only, args.limit)
        print(f"{len(specs)} models, {args.jobs} worker(s)", file=sys.stderr)
        results = sweep(specs, args.jobs, args.timeout, args.mem_gib, families, args.param_budget)
        run = {"wall_s": round(time.perf_counter() - t0, 1), "jobs": args.jobs}
        _write(args.out / "zoo.json", json.dumps(results, indent=1) + "\n")
        _write(args.out / "zoo_run.json", json.dumps(run) + "\n")
    peers_file = args.out / "zoo_peers.json"
    peers = json.loads(peers_file.read_text()) if peers_file.is_file() else None
    text = markdown(results, families, run["wall_s"], run["jobs"], peers)
    _write(args.out / "zoo.md", text)
    print(text, end="")


if __name__ == "__main__":
    main()
