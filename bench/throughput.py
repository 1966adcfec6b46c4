"""Training throughput, full precision vs binarized (IR-Net W1A1, the fused sign op).

The table (bench/results/throughput.json + .md, on docs/benchmarks.md):

    python -m bench.throughput --table [--device cuda] [--cases resnet18-28,resnet34-224] [--compile 0,1]

one row per case, device and compile setting: images/s of FP and binary training steps (forward,
backward, AdamW step; random inputs, so data loading is not timed), their ratio, and the step's
peak memory above what was resident before it (weights, optimizer state): CUDA
`max_memory_allocated`, CPU peak RSS (VmHWM, reset through /proc/self/clear_refs, in a second run of
the row in which glibc is told to return large blocks to the system so that RSS follows the tensors;
the speed comes from a run with the default allocator). FP and binary repeats
alternate in one process, one process per row. Cases: resnet18 1x28x28 batch 128 fp32 (the
Fashion-MNIST recipe's model) and resnet34 3x224x224 under bf16 autocast (batch 128 on a GPU, 16 on
the CPU).

Where the memory goes (bench/results/throughput_census.json + .md, on docs/benchmarks.md):

    python -m bench.throughput --census

one training step of the resnet18 case, FP and binary, under a dispatch mode that notes every tensor the
step makes: the tensors still alive after the forward (what autograd keeps for the backward), in MiB
by the op and module that made them, and the most tensor memory alive at once during the backward.

What a compiled step keeps for its backward, FP and binary, MiB by the op that made it:

    python -m bench.throughput --saved resnet34-224 --side 112

The older single measurement on real data, alone or under torchrun (bench/distributed.py):

    python -m bench.throughput                                      # 1 process
    torchrun --standalone --nproc_per_node=2 -m bench.throughput    # 2 processes (gloo on CPU)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import irconvert
from irconvert import distributed
from irconvert.models import create_model
from irconvert.run import build_model
from irconvert.data import build_data
from irconvert.recipe import load_recipe
from irconvert.train import _autocast, logits_of

from .common import RESULTS, write_results


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


CASES = {  # name: (model, recipe-style kwargs, input shape, dtype, batch on GPU, batch on CPU)
    "resnet18-28": ("resnet18", {"num_classes": 10, "in_chans": 1}, (1, 28, 28), "fp32", 128, 128),
    "resnet34-224": ("resnet34", {"num_classes": 1000}, (3, 224, 224), "bf16", 128, 16),
}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_step(model, x, y, amp: str):
    """Return a function running one training step of `model` on (x, y)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    device = x.device

    def step():
        with _autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(logits_of(model(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def peak_mib(step, device: torch.device) -> float:
    """Return the peak memory of one step above what was resident before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return _rss_mib("VmHWM") - before


def case_models(name: str, device: torch.device, side: int | None = None, policy_fields: dict | None = None):
    """Return (FP model, its binarized twin, inputs, labels, amp) of case `name` on `device` (`side`: another
    input side than the case's; `policy_fields`: Policy fields over the case's policy)."""
    arch, kwargs, shape, dtype, gpu_batch, cpu_batch = CASES[name]
    batch = gpu_batch if device.type == "cuda" else cpu_batch
    torch.manual_seed(0)
    if name == "resnet18-28":  # the Fashion-MNIST recipe's model: stride-2 stem, no max-pool
        recipe = load_recipe(RECIPE)
        fp = create_model(arch, "timm", adapt={"first_stride": recipe.model.first_stride,
                                               "stem_pool": recipe.model.stem_pool}, **kwargs)
        policy = recipe.binarize
    else:
        fp = create_model(arch, "timm", **kwargs)
        policy = None
    if policy_fields:
        policy = (policy or irconvert.Policy()).model_copy(update=policy_fields)
    binary = irconvert.binarize(fp, policy).to(device)
    fp = fp.to(device)
    shape = shape if side is None else (shape[0], side, side)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    return fp, binary, x, y, "bf16" if dtype == "bf16" else "off"


def compiled_saved(name: str, side: int | None) -> None:
    """Print what a compiled training step keeps from its forward for its backward, FP and binary: the saved
    outputs of the AOT partition (inductor's min-cut partitioner, no code generation), MiB by producing op
    and dtype. Graph inputs (parameters) are resident anyway and cost no extra memory."""
    import warnings
    from collections import Counter

    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def backend(label):
        def partition(joint, inputs, **kw):
            fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
            out = next(n for n in fw.graph.nodes if n.op == "output")
            kept = Counter()
            for node in out.args[0][kw.get("num_fwd_outputs", 1):]:
                val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
                if isinstance(val, torch.Tensor):
                    maker = "parameter / input" if node.op == "placeholder" else getattr(node.target, "__name__", node.op)
                    kept[(maker, str(val.dtype).removeprefix("torch."))] += val.numel() * val.element_size()
            extra = sum(b for (maker, _), b in kept.items() if maker != "parameter / input")
            print(f"{label}: keeps {extra / 2**20:.1f} MiB beyond its parameters")
            for (maker, dtype), b in kept.most_common():
                print(f"  {maker:32s} {dtype:9s} {b / 2**20:8.1f} MiB")
            return fw, bw

        return lambda gm, ex: aot_module_simplified(gm, ex, fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g,
                                                    partition_fn=partition)

    fp, binary, x, y, amp = case_models(name, torch.device("cpu"), side)
    for label, model in (("FP", fp), ("binary", binary)):
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_step(torch.compile(model, backend=backend(label)), x, y, amp)()


def run_case(name: str, device: torch.device, compiled: bool, repeats: int, steps: int,
             policy_fields: dict | None = None) -> dict:
    """Return one table row: FP and binary training images/s (alternating repeats) and step peak memory."""
    fp, binary, x, y, amp = case_models(name, device, policy_fields=policy_fields)
    arch, _, shape, dtype, _, _ = CASES[name]
    batch = len(x)
    steps_of = {}
    for label, model in (("fp", fp), ("binary", binary)):
        model.train()
        steps_of[label] = make_step(torch.compile(model) if compiled else model, x, y, amp)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {"fp": [], "binary": []}
    for label in times:  # warm-up (and compilation)
        for _ in range(2):
            steps_of[label]()
    peaks = {label: peak_mib(steps_of[label], device) for label in times}
    for _ in range(repeats):
        for label in times:
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_of[label]()
            sync()
            times[label].append((time.perf_counter() - t0) / steps)
    fp_s, bin_s = statistics.median(times["fp"]), statistics.median(times["binary"])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    label = f"{arch} {'x'.join(map(str, shape))}" + "".join(f", {k}={json.dumps(v)}"
                                                            for k, v in (policy_fields or {}).items())
    return {"case": label, "device": device.type, "card": card,
            "threads": torch.get_num_threads(), "dtype": dtype, "compile": compiled, "batch": batch,
            "fp_img_s": round(batch / fp_s, 1), "binary_img_s": round(batch / bin_s, 1),
            "ratio": round(fp_s / bin_s, 3), "fp_peak_mib": round(peaks["fp"], 1),
            "binary_peak_mib": round(peaks["binary"], 1), "repeats": repeats, "steps_per_repeat": steps}


class _Census(TorchDispatchMode):
    """Notes every tensor storage an op makes (op, module, bytes) and the peak of those alive in the backward."""

    def __init__(self, where: list[str]):
        super().__init__()
        self.where, self.made, self.backward, self.peak, self.at_peak = where, {}, False, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr():
                st = t.untyped_storage()
                old = self.made.get(st.data_ptr())
                if old is None or old[0].expired():
                    self.made[st.data_ptr()] = (StorageWeakRef(st), func.__name__, self.where[-1], st.nbytes(),
                                                str(t.dtype).removeprefix("torch."))
        if self.backward and (live := self.live()) > self.peak:
            self.peak, self.at_peak = live, self.by_maker()
        return out

    def live(self) -> int:
        return sum(v[3] for v in self.made.values() if not v[0].expired())

    def by_maker(self) -> dict[str, float]:
        """Return MiB of the live storages by 'op (module, dtype)' of the op that made them."""
        mib = collections.Counter()
        for ref, op, module, nbytes, dtype in self.made.values():
            if not ref.expired():
                mib[f"{op} ({module}, {dtype})"] += nbytes / 2**20
        return {k: round(v, 1) for k, v in mib.most_common() if v >= 0.05}


def census(model, x, y) -> dict:
    """Return what one training step of `model` keeps after its forward, by (op, module, dtype), and its
    backward's peak of live tensors, in MiB."""
    where = ["-"]
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, a: where.append(type(mod).__name__) and None)
        m.register_forward_hook(lambda mod, a, o: where.pop() and None)
    step = make_step(model.train(), x, y, "off")
    step(), step()  # AdamW's state exists, as in the timed steps
    mode = _Census(where)
    with mode:
        loss = torch.nn.functional.cross_entropy(logits_of(model(x)).float(), y)
        kept, kept_mib = mode.by_maker(), mode.live() / 2**20
        mode.where.append("backward")
        mode.backward = True
        loss.backward()
    return {"kept": kept, "kept_mib": round(kept_mib, 1), "backward_peak": mode.at_peak,
            "backward_peak_mib": round(mode.peak / 2**20, 1)}


def census_table(rows: dict) -> str:
    """Return the benchmarks page table of the census: MiB alive after the forward and at the backward's peak, by the
    op (module, dtype) that made the tensors, FP beside binary."""
    fp, b = rows["fp"], rows["binary"]
    keys = list(dict.fromkeys([*b["kept"], *fp["kept"], *b["backward_peak"], *fp["backward_peak"]]))
    lines = ["| tensors made by (op, module, dtype) | FP: after forward | binary: after forward "
             "| FP: backward's peak | binary: backward's peak |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {k} | {fp['kept'].get(k, '')} | {b['kept'].get(k, '')} | {fp['backward_peak'].get(k, '')} "
              f"| {b['backward_peak'].get(k, '')} |" for k in keys]
    lines.append(f"| **all (MiB)** | **{fp['kept_mib']}** | **{b['kept_mib']}** | **{fp['backward_peak_mib']}** "
                 f"| **{b['backward_peak_mib']}** |")
    return "\n".join(lines)


def run_census() -> None:
    """Write bench/results/throughput_census.json and .md for the resnet18 case."""
    arch, kwargs, shape, _, _, batch = CASES["resnet18-28"]
    recipe = load_recipe(RECIPE)
    torch.manual_seed(0)
    fp = create_model(arch, "timm", adapt={"first_stride": recipe.model.first_stride,
                                           "stem_pool": recipe.model.stem_pool}, **kwargs)
    binary = irconvert.binarize(fp, recipe.binarize)
    x, y = torch.randn(batch, *shape), torch.randint(0, kwargs["num_classes"], (batch,))
    rows = {label: census(model, x, y) for label, model in (("fp", fp), ("binary", binary))}
    write_results("throughput_census", rows, census_table(rows))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table_markdown(rows: list[dict]) -> str:
    """Return the benchmarks page table of the rows."""
    lines = ["| case | device | card | dtype | compile | batch | FP img/s | binary img/s | binary / FP "
             "| FP peak MiB | binary peak MiB | binary / FP memory |", "|" + "---|" * 12]
    for r in rows:
        card = r["card"] + (f", {r['threads']} threads" if r["device"] == "cpu" else "")
        mem = r["binary_peak_mib"] / r["fp_peak_mib"] if r["fp_peak_mib"] > 0 else float("nan")
        lines.append(f"| {r['case']} | {r['device']} | {card} | {r['dtype']} | {r['compile']} | {r['batch']} "
                     f"| {r['fp_img_s']} | {r['binary_img_s']} | {r['ratio']:.2f} | {r['fp_peak_mib']} "
                     f"| {r['binary_peak_mib']} | {mem:.2f} |")
    return "\n".join(lines)


def _row(case: str, device: str, compiled: bool, repeats: int, steps: int, env: dict, root: str,
         sets: list[str]) -> dict | None:
    """Run one (case, compile) row in its own process; return it, or None (its stderr printed) if it failed."""
    cmd = [sys.executable, "-m", "bench.throughput", "--row", case, "--device", device,
           "--compile", str(int(compiled)), "--repeats", str(repeats), "--steps", str(steps)]
    cmd += [arg for item in sets for arg in ("--set", item)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(device: str, cases: list[str], compiles: list[bool], repeats: int, steps: int,
          sets: list[str] = ()) -> None:
    """Run each (case, compile) in its own process and merge the rows into bench/results/throughput.json.

    On the CPU a row runs twice: once for the speed with the default allocator, once for the peak RSS with
    glibc told to return every block over 64 KiB to the system (so RSS follows the tensors); that setting
    page-faults every large allocation and slowed the binary step more than the FP one (0.62 vs 0.66)."""
    root = str(RECIPE.parents[1])
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = RESULTS / "throughput.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    for case in cases:
        for compiled in compiles:
            row = _row(case, device, compiled, repeats, steps, env, root, sets)
            if row is not None and device == "cpu":
                mem = _row(case, device, compiled, repeats, steps, {**env, "MALLOC_MMAP_THRESHOLD_": "65536"}, root,
                           sets)
                row = row if mem is None else {**row, "fp_peak_mib": mem["fp_peak_mib"],
                                               "binary_peak_mib": mem["binary_peak_mib"]}
            if row is None:
                continue
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["case"], r["device"], r["compile"]) != (row["case"], device, compiled)]
            rows.append(row)
            rows.sort(key=lambda r: (r["device"], r["case"], r["compile"]))
            write_results("throughput", rows, table_markdown(rows))  # after each row: a long run keeps what it did


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", action="store_true", help="run the cases and write bench/results/throughput.*")
    ap.add_argument("--row", choices=sorted(CASES), help="(internal) print one table row as JSON")
    ap.add_argument("--census", action="store_true", help="write bench/results/throughput_census.* (memory)")
    ap.add_argument("--saved", choices=sorted(CASES), help="print what case's compiled step keeps for its backward")
    ap.add_argument("--side", type=int, help="--saved: input side (default: the case's)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--compile", default="0,1", help="0, 1 or 0,1")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30; --table: per repeat, 2)")
    ap.add_argument("--batch", type=int, default=128, help="global batch (split over processes)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help="--table/--row: a Policy field over the case's policy (a row of its own, the fields in "
                         "its case name), e.g. --set rsign=true --set activation='\"rprelu\"'")
    args = ap.parse_args()
    try:
        policy_fields = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    except ValueError:
        ap.error("--set takes FIELD=JSON, e.g. rsign=true or activation='\"rprelu\"'")
    if args.steps is None:
        args.steps = 2 if (args.row or args.table) else 30
    if args.census:
        run_census()
        return
    if args.saved:
        compiled_saved(args.saved, args.side)
        return
    if args.row:
        print(json.dumps(run_case(args.row, torch.device(args.device), args.compile == "1", args.repeats,
                                  args.steps, policy_fields)), flush=True)
        return
    if args.table:
        table(args.device, args.cases.split(","), [c == "1" for c in args.compile.split(",")], args.repeats,
              args.steps, args.set)
        return
    device = torch.device(args.device)
    world = distributed.setup("auto", device)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
    recipe = load_recipe(RECIPE, [f"data.batch_size={args.batch // world.size}"])
    data = build_data(recipe.data)
    train, _ = data.loaders(recipe.data, torch.Generator(), 0, world.rank, world.size)
    torch.manual_seed(0)
    fp = build_model(recipe, data.info).to(device)
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
