"""Write the benchmark tables into the docs and the README's headline table, from bench/results only.

    python -m bench.update_docs           # rewrite docs/benchmarks.md's tables, docs/img/, README's headline
    python -m bench.update_docs --check   # exit 1 and name what is stale (tests/test_docs.py runs it)

`docs/benchmarks.md` holds the prose; each table sits between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` and is bench/results/NAME.md (its own `# ` heading dropped). Every result file
that no marker names is listed at the end, between `<!-- bench:others -->` markers, so a new
benchmark shows up without an edit. A picture `img/NAME.png` in the page is bench/results/NAME.png.
The README's table between `<!-- headline -->` markers is built from the results' JSON by `headline`.
Nothing here is typed by hand: change a result by rerunning its benchmark, then this script.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"
IMAGES = ROOT / "docs" / "img"
README = ROOT / "README.md"
OTHERS = "others"


def _body(md: Path, level: int = 0) -> str:
    """Return a result's Markdown without its title, its headings nested below a heading of `level`."""
    body = md.read_text().rstrip()
    if body.startswith("# "):  # the page's own heading names the table
        body = body.split("\n", 1)[1].lstrip()
    lines = body.split("\n")
    levels = [len(h) - len(h.lstrip("#")) for h in lines if re.match(r"#+ ", h)]
    shift = max(0, level + 1 - min(levels)) if levels else 0
    return "\n".join("#" * shift + h if re.match(r"#+ ", h) else h for h in lines)


def _level(text: str, at: int) -> int:
    """Return the level of the last heading before position `at` of a Markdown page (0: none)."""
    heads = re.findall(r"^(#+) ", text[:at], re.M)
    return len(heads[-1]) if heads else 0


def _block(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)


def benchmarks_page(text: str, results: Path = RESULTS) -> str:
    """Return the benchmarks page `text` with every marked table (and the list of the others) filled in."""
    named = set(re.findall(r"<!-- bench:([\w.-]+) -->", text)) - {OTHERS}
    for name in sorted(named):
        md = results / f"{name}.md"
        if not md.is_file():
            raise SystemExit(f"{PAGE.relative_to(ROOT)}: marker bench:{name} names no bench/results/{name}.md")
        text = _block(name).sub(lambda m: m.group(1) + _body(md, _level(text, m.start())) + "\n" + m.group(2), text)
    rest = [md for md in sorted(results.glob("*.md")) if md.stem not in named]
    others = "".join(f"\n### `{md.stem}`\n\n{_body(md, 3)}\n" for md in rest) or "\nNone.\n"
    return _block(OTHERS).sub(lambda m: m.group(1) + others.lstrip("\n") + m.group(2), text)


def _load(name: str):
    return json.loads((RESULTS / f"{name}.json").read_text())


def headline() -> str:
    """Return the README's one table of headline results, each row read from a bench/results JSON."""
    qs = _load("quickstart")
    best = next(r for r in _load("accuracy-long-tmin1") if r["mode"] == "W1A1")
    fp = next(r for r in _load("accuracy-long-tmin1") if r["mode"] == "FP")
    size = next(r for r in _load("sizes") if r["model"] == "resnet18")
    rt = next(r for r in _load("runtime") if r["case"] == "timm resnet18 224x224" and r["batch"] == 1
              and r["threads"] == 2)
    step = next(r for r in _load("throughput") if r["case"] == "resnet18 1x28x28" and not r["compile"])
    zoo = []
    for name, what in (("zoo-fast", "fast list"), ("zoo-timm", "timm families"), ("zoo-torchvision", "torchvision")):
        rows = _load(name)
        zoo.append(f"{what} {sum(r['status'] == 'ok' for r in rows)} of {len(rows)}")
    rows = [
        ("the first command (quickstart), Fashion-MNIST test top-1",
         f"FP {qs['fp_top1']:.2f}% → {qs['mode']} {qs['binary_top1']:.2f}% in {qs['wall_seconds'] / 60:.1f} min on "
         f"{qs['cpu_cores']}{' idle' if qs.get('other_runnable_tasks') == 0 else ''} CPU cores", "quickstart"),
        ("best W1A1 measured, Fashion-MNIST (`recipes/fashion-mnist-accuracy.yaml`, 2 seeds)",
         f"{best['top1_mean']:.2f} ± {best['top1_std']:.2f}% (FP {fp['top1_mean']:.2f}%)", "accuracy-on-fashion-mnist"),
        ("packed file, timm resnet18",
         f"{size['packed_mib']:.2f} MiB against {size['fp32_mib']:.2f} MiB fp32 (1/{1 / size['ratio']:.1f})", "file-sizes"),
        ("bitwise CPU runtime, timm resnet18 224x224, batch 1",
         f"{rt['speedup']:.1f}x torch fp32 on {rt['threads']} threads", "bitwise-runtime"),
        ("a binary training step against FP (resnet18, CPU, eager)",
         f"{step['ratio']:.2f} of FP's images/s, {step['binary_peak_mib'] / step['fp_peak_mib']:.2f}x its peak memory",
         "training-throughput"),
        ("model zoo: converts, exports, reloads exactly and learns", ", ".join(zoo), "model-zoo"),
    ]
    real = []  # bench.zoo_real: trained models converted on real data, per list run
    for name in ("fast", "timm", "torchvision"):
        path = RESULTS / f"zoo-real-{name}.json"
        if path.is_file():
            from bench.zoo_real import median_gap, within

            data = json.loads(path.read_text())
            ok = [r for r in data["rows"] if r["status"] == "ok"]
            total = len(data["rows"]) + len(data.get("unrun", [])) if "unrun" in data else 40
            real.append(f"{name} list {within(ok)} of {len(data['rows'])} models measured (of {total}), median gap "
                        f"{median_gap(ok):.1f} points")
    if real:
        from bench.zoo_real import WITHIN

        rows.append((f"the zoo on real data: a trained model's binary twin within {WITHIN:g} points of it (Fashion-MNIST)",
                     "; ".join(real), "the-zoo-on-real-data"))
    lines = ["| measured | result | details |", "|---|---|---|"]
    lines += [f"| {what} | {result} | [benchmarks](docs/benchmarks.md#{anchor}) |" for what, result, anchor in rows]
    return "\n".join(lines)


def _unrun(name: str, specs: list[str] | None = None) -> str:
    """What running zoo_real's `specs` of the `name` list (all of the learns sweep's list of that name when None)
    would take here: each model's learns-sweep seconds times the median ratio of zoo_real's seconds to the
    sweep's, over the models both measured, on 2 workers."""
    import statistics

    sweep = RESULTS / f"zoo-{name}.json"
    if not sweep.is_file():
        return ""
    spec = lambda r: r["model"] if r["source"] == "timm" else f"{r['source']}:{r['model']}"
    swept = {}
    for path in (RESULTS / f"zoo-{n}.json" for n in ("fast", "timm", "torchvision")):
        data = json.loads(path.read_text()) if path.is_file() else []
        swept.update({spec(r): r["seconds"] for r in data if r.get("seconds")})
    ratios = []
    for path in sorted(RESULTS.glob("zoo-real-*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and not data.get("config", {}).get("tag"):
            ratios += [r["seconds"] / swept[spec(r)] for r in data.get("rows", [])
                       if r["status"] == "ok" and not r.get("reused_from") and swept.get(spec(r))]
    if specs is None:
        specs = [spec(r) for r in json.loads(sweep.read_text())]
    if not ratios or not specs:
        return ""
    ratio = statistics.median(ratios)
    fallback = statistics.median(swept.values())
    hours = sum(swept.get(s, fallback) * ratio for s in specs) / 2 / 3600
    return (f"{len(specs)} models, about {hours:.0f} hours on 2 workers here (each one's learns-sweep seconds times "
            f"{ratio:.0f}, the median ratio of zoo_real's seconds to the sweep's over the {len(ratios)} models both "
            "measured, on a busy machine)")


def misses() -> str:
    """Return the README's list of zoo_real misses: each model of the untagged fast, timm and torchvision runs
    whose binary twin is over WITHIN points from its FP twin (or failed), with what its run measured."""
    from bench.zoo_real import WITHIN, diagnosis, final_losses, median_gap, within

    lines = []
    for name in ("fast", "timm", "torchvision"):
        path = RESULTS / f"zoo-real-{name}.json"
        if not path.is_file():
            unrun = _unrun(name)
            lines.append(f"- **{name}** list: not run yet{': ' + unrun if unrun else ''}.")
            continue
        data = json.loads(path.read_text())
        rows = data["rows"]
        ok = [r for r in rows if r["status"] == "ok"]
        ref = final_losses(rows)
        missed = sorted((r for r in rows if diagnosis(r)), key=lambda r: -(r["gap"] if r["gap"] is not None else 1e9))
        lines.append(f"- **{name}** list, {len(rows)} models measured: {within(ok)} within {WITHIN:g} points "
                     f"({within(ok) / max(len(rows), 1):.0%}), median gap {median_gap(ok) or 0:.1f}; "
                     f"{len(missed)} miss{'es' if len(missed) != 1 else ''}:")
        lines += [f"  - {'torchvision:' if r['source'] == 'torchvision' else ''}{r['model']}"
                  f"{'' if r['gap'] is None else ' ' + format(r['fp_top1'], '.1f') + ' → ' + format(r['binary_top1'], '.1f')}"
                  f": {diagnosis(r, ref)}" for r in missed]
        if data.get("unrun"):
            lines.append(f"  - not run yet: {_unrun(name, data['unrun']) or str(len(data['unrun'])) + ' models'}.")
    return "\n".join(lines)


def readme(text: str) -> str:
    """Return README `text` with its headline table and the zoo_real misses regenerated."""
    for tag, make in (("headline", headline), ("zoo-real-misses", misses)):
        pattern = re.compile(rf"(<!-- {tag} -->\n).*?(<!-- /{tag} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no <!-- {tag} --> ... <!-- /{tag} --> block")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    return text


def outputs() -> dict[Path, bytes]:
    """Return every generated file and the contents it should have."""
    page = benchmarks_page(PAGE.read_text())
    out = {PAGE: page.encode(), README: readme(README.read_text()).encode()}
    for name in sorted(set(re.findall(r"\]\(img/([\w.-]+)\.png\)", page))):
        png = RESULTS / f"{name}.png"
        if not png.is_file():
            raise SystemExit(f"{PAGE.relative_to(ROOT)}: img/{name}.png names no bench/results/{name}.png")
        out[IMAGES / f"{name}.png"] = png.read_bytes()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a generated file is stale")
    args = ap.parse_args(argv)
    stale = [path for path, data in outputs().items() if not path.is_file() or path.read_bytes() != data]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)}: stale; run python -m bench.update_docs", file=sys.stderr)
        return 1 if stale else 0
    for path, data in outputs().items():
        if path in stale:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
