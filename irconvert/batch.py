"""Batch conversion for CI pipelines: many models in one call, each in its own process, so one
failure (even a crash) is reported and the others go on. Writes a JSON report and a JUnit XML
report; the exit code is 0 only if every model succeeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

from .errors import IRConvertError
from .fileformat import atomic_path, write_text
from .recipe import policy_from_sets, read_yaml_file


def read_model_list(path: os.PathLike | str) -> list[dict]:
    """Return [{'name': ..., 'set': [...], 'entry': N}] from a YAML list of names or {name, set} mappings."""
    path = Path(path)
    if not path.is_file():
        raise IRConvertError(f"{path}: model list not found; pass an existing YAML file")
    items = read_yaml_file(path, "model list")
    if not isinstance(items, list) or not items:
        raise IRConvertError(f"{path}: a model list is a YAML list of names or {{name: ..., set: [key=value]}}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        sets = item.get("set") or [] if isinstance(item, dict) else []
        if (not isinstance(item, dict) or not isinstance(item.get("name"), str) or set(item) - {"name", "set"}
                or not isinstance(sets, list) or not all(isinstance(s, str) for s in sets)):
            raise IRConvertError(f"{path}: entry {i + 1} must be a name or {{name: ..., set: [key=value, ...]}}")
        out.append({"name": item["name"], "set": list(sets), "entry": i + 1})
    return out


def check_entries(models: list[dict], models_file: Optional[str], recipe_path: Optional[str],
                  overrides: tuple[str, ...] = ()) -> None:
    """Refuse, before the first model's process starts and so before anything is written, an entry
    whose model name or --set values its process would refuse: the recipe's fields with a recipe, else
    the policy's (--convert-only without a recipe takes binarize.* only)."""
    from .models import check_name
    from .run import recipe_for

    for m in models:
        sets = (*overrides, *m["set"])
        try:
            check_name(m["name"])
            if recipe_path:
                recipe_for(m["name"], recipe_path, sets)
            elif sets:
                policy_from_sets(list(sets))
        except IRConvertError as exc:
            if "entry" not in m or (not m["set"] and "model.name" not in exc.args[0]):
                raise  # a name or --set of the command line itself: its own message says it
            # args[0] keeps the message's flag markers, so the command line still says --set, not overrides=
            raise IRConvertError(f"{models_file}: entry {m['entry']} ({m['name']}): {exc.args[0]}") from None


def model_dir(out: Path, name: str) -> Path:
    """Return the run folder of model `name` under `out` (':' and '/' made '_')."""
    return out / name.replace(":", "_").replace("/", "_")


def child_argv(recipe_path: Optional[str] = None, overrides: tuple[str, ...] = (), resume: bool = False,
               overwrite: bool = False, convert_only: bool = False, seed: Optional[int] = None,
               device: Optional[str] = None) -> list[str]:
    """Return the command-line options every model's process of a batch gets (the one place they are built)."""
    argv = ["--recipe", str(recipe_path)] if recipe_path else []
    argv += [flag for flag, on in (("--resume", resume), ("--overwrite", overwrite), ("--convert-only", convert_only)) if on]
    argv += [a for flag, v in (("--seed", seed), ("--device", device)) if v is not None for a in (flag, str(v))]
    return argv + [a for s in overrides for a in ("--set", s)]


def run_batch(models: list[dict], out: Path, common_args: list[str], timeout: Optional[float] = None,
              log=print) -> list[dict]:
    """Convert each model in a subprocess (`python -m irconvert NAME ... --out OUT/NAME`); return results."""
    results = []
    for m in models:
        target = model_dir(out, m["name"])
        cmd = [sys.executable, "-m", "irconvert", m["name"], *common_args, "--out", str(target)]
        for s in m["set"]:
            cmd += ["--set", s]
        t0 = time.time()
        log(f"=== {m['name']}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired:
            code, err = -1, f"timed out after {timeout:.0f}s"
        seconds = round(time.time() - t0, 2)
        row = {"model": m["name"], "status": "ok" if code == 0 else "fail", "exit_code": code, "seconds": seconds,
               "out": str(target), "error": None}
        if code == 0 and (target / "report.json").is_file():
            report = json.loads((target / "report.json").read_text())
            row.update({k: report.get(k) for k in ("fp", "binary", "packed_max_abs_diff", "size", "file_bytes",
                                                   "binary_layers", "kept_layers")})
        else:
            lines = [l for l in err.strip().splitlines() if l.strip()]
            row["error"] = lines[-1][:500] if lines else f"exit code {code}"
        log(f"    {row['status']} in {seconds:.1f}s" + (f": {row['error']}" if row["error"] else ""))
        results.append(row)
    return results


def write_reports(results: list[dict], json_path: Path, junit_path: Path) -> None:
    """Write the JSON report and a JUnit XML report (one testcase per model)."""
    write_text(json_path, json.dumps(results, indent=2))
    suite = ET.Element("testsuite", name="irconvert", tests=str(len(results)),
                       failures=str(sum(r["status"] != "ok" for r in results)),
                       time=f"{sum(r['seconds'] for r in results):.2f}")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="irconvert.convert", name=r["model"], time=f"{r['seconds']:.2f}")
        if r["status"] != "ok":
            ET.SubElement(case, "failure", message=r["error"] or "failed").text = r["error"] or ""
        else:
            ET.SubElement(case, "system-out").text = json.dumps({k: r.get(k) for k in ("binary", "packed_max_abs_diff")})
    with atomic_path(junit_path) as tmp:
        ET.ElementTree(suite).write(tmp, encoding="utf-8", xml_declaration=True)
