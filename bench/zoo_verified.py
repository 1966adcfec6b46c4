"""Write irconvert/zoo_verified.json: what the model-zoo sweep (bench.zoo) verified for each model, small
enough to ship with the package, so that `irconvert list-models` can say it without bench/results.

    python -m bench.zoo_verified      # after python -m bench.zoo; reads bench/results/zoo-*.json

One entry per model ('resnet18', 'torchvision:resnet18'): the sweep's status ('ok': binarized, trained
20 steps, exported and rebuilt exactly; 'fail' with the stage and reason), the binary share of its MACs
and the packed size as a share of fp32, and the sweep lists it came from. Models in several lists
keep their 'ok' (a list that ran it at another input size may fail it for that size alone).
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LISTS = ("fast", "timm", "torchvision")  # bench/results/zoo-<list>.json, the sweep's outputs
OUT = ROOT / "irconvert" / "zoo_verified.json"


def entry(row: dict) -> dict:
    """Return the shipped fields of one sweep row."""
    e = {"status": row["status"]}
    if row["status"] == "ok":
        e.update(binary_mac_share=row.get("binary_mac_share"), size_ratio=row.get("size_ratio"))
    else:
        why = " ".join(f"{row.get('stage', '')}: {row.get('reason', '')}".split())
        e["reason"] = why if len(why) <= 160 else why[:160].rsplit(" ", 1)[0] + " ..."
    return e


def summarize(results: Path = ROOT / "bench" / "results") -> dict:
    """Return {'generated_by', 'lists', 'models': {name: entry}} from the sweep's result files."""
    models: dict[str, dict] = {}
    for name in LISTS:
        path = results / f"zoo-{name}.json"
        for row in json.loads(path.read_text()):
            key = row["model"] if row.get("source", "timm") == "timm" else f"{row['source']}:{row['model']}"
            new = {**entry(row), "lists": [name]}
            old = models.get(key)
            if old is None:
                models[key] = new
            else:
                lists = old["lists"] + [name]
                models[key] = {**(old if old["status"] == "ok" or new["status"] != "ok" else new), "lists": lists}
    return {"generated_by": "python -m bench.zoo_verified", "lists": [f"bench/results/zoo-{n}.json" for n in LISTS],
            "models": dict(sorted(models.items()))}


def main() -> None:
    data = summarize()
    models = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in data["models"].items())
    head = json.dumps({k: v for k, v in data.items() if k != "models"})[:-1]
    OUT.write_text(f'{head}, "models": {{\n{models}\n}}}}\n')  # one line per model: a readable diff
    ok = sum(e["status"] == "ok" for e in data["models"].values())
    print(f"wrote {OUT.relative_to(ROOT)}: {len(data['models'])} models, {ok} ok")


if __name__ == "__main__":
    main()
