"""Time the README's first command and record what it prints: FP and binary top-1, wall time.

    python -m bench.quickstart            # bench/results/quickstart.{json,md}

It runs `python -m irconvert resnet18 --recipe recipes/quickstart.yaml` into a temporary folder, in a
fresh process as a user would (imports, data loading, the pretrained file, training, evaluation of
the 10,000 test images, export and verification all count), and reads its report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import write_results

ROOT = Path(__file__).resolve().parents[1]


def run_quickstart(out: Path, overrides: list[str]) -> tuple[dict, float]:
    """Run the quickstart command into `out`; return its report and the wall seconds."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, "-m", "irconvert", "resnet18", "--recipe", str(ROOT / "recipes" / "quickstart.yaml"),
           "--out", str(out), *sets]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"quickstart failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "report.json").read_text()), wall


def _runnable() -> int:
    """Return the number of runnable tasks now (/proc/loadavg's 4th field), this process included."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return 1


def levers_table() -> None:
    """Write quickstart-levers.md/json: one row per qs-* run (a lever tried on the quickstart), best last."""
    from .common import RESULTS

    base = "irconvert resnet18 --recipe recipes/quickstart.yaml"
    rows = [json.loads(p.read_text()) | {"name": p.stem[3:]} for p in sorted(RESULTS.glob("qs-*.json"))]
    rows.sort(key=lambda r: r["binary_top1"])
    lines = ["| run | overrides | binary top-1 (%) | gap to FP |", "|---|---|---|---|"]
    for r in rows:
        sets = "; ".join(o for o in r["command"][len(base):].split(" --set ") if o.strip()) or "(the recipe as it was)"
        lines.append(f"| {r['name']} | {sets} | {r['binary_top1']:.2f} | {r['gap']:+.2f} |")
    head = ("Levers tried on the quickstart before its recipe took them (bench/results/qs-*.json): each run is the "
            "recipe as it was then (1 binary epoch of 469 steps, lr 0.001, distillation alpha 0.9 at T 4, every "
            "1x1 downsample binary; it scored 76.80%) with the overrides listed, seed 0, two runs at a time on "
            "one thread each (so their minutes are not comparable). FP: the shipped model, 92.21%.\n\n")
    write_results("quickstart-levers", rows, head + "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override")
    ap.add_argument("--name", default="quickstart")
    ap.add_argument("--levers", action="store_true",
                    help="only gather bench/results/qs-*.json (runs made with --name qs-...) into quickstart-levers.md")
    args = ap.parse_args()
    if args.levers:
        return levers_table()
    others = _runnable() - 1  # other jobs on the cores when it starts: said next to the figure
    with tempfile.TemporaryDirectory(prefix="irconvert-quickstart-") as tmp:
        report, wall = run_quickstart(Path(tmp) / "run", args.set)
    row = {"command": "irconvert resnet18 --recipe recipes/quickstart.yaml" + "".join(f" --set {o}" for o in args.set),
           "fp_top1": round(report["fp"]["top1"], 2), "binary_top1": round(report["binary"]["top1"], 2),
           "gap": round(report["binary"]["top1"] - report["fp"]["top1"], 2), "mode": report["mode"],
           "method": report["method"], "wall_seconds": round(wall, 1), "stage_seconds": report["seconds"],
           "cpu_cores": os.cpu_count(), "other_runnable_tasks": others}
    table = (f"`{row['command']}` on {row['cpu_cores']} CPU cores ({'idle' if others <= 0 else f'{others} other runnable tasks'} "
             f"when it started), kernels already "
             f"built: {row['wall_seconds'] / 60:.1f} minutes from start to exit.\n\n"
             "| FP top-1 (%) | binary top-1 (%) | gap | mode | method |\n|---|---|---|---|---|\n"
             f"| {row['fp_top1']:.2f} | {row['binary_top1']:.2f} | {row['gap']:+.2f} | {row['mode']} | {row['method']} |")
    write_results(args.name, row, table)


if __name__ == "__main__":
    main()
