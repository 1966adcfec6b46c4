"""The 40 deployment models (bench/zoo_lists.FAST) through installable peers, with the same stages as
bench/zoo.py as far as each tool allows: convert with the tool's own API (binary weights and
activations, first and last conv/linear by module order left full precision), one SGD step,
save the state_dict to safetensors, rebuild (fresh model, convert, load), compare eval outputs
(max abs diff <= 1e-5). None of the peers writes a 1-bit packed file of a whole model, so "export"
is their state_dict.

Each tool runs in its own virtual environment that reuses this machine's torch through a .pth file:

    python -m venv /tmp/peer-brevitas
    python -c "import site; print(site.getsitepackages()[0])" > /tmp/peer-brevitas/lib/python3.11/site-packages/system.pth
    /tmp/peer-brevitas/bin/pip install brevitas
    /tmp/peer-brevitas/bin/python bench/zoo_peers.py brevitas     # also: bnn, bnn-lab

Appends the tool's counts to bench/results/zoo_peers.json (zoo.md shows them) and writes
bench/results/zoo_peers_TOOL.json (one record per model).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent

from bench.zoo_lists import FAST  # noqa: E402

SIDE = 64


def build(spec: str):
    """Return (builder, model with 10 classes, input side): 64x64 where it runs, img_size=64 for fixed-size timm models, else native."""
    import timm
    import torchvision

    source, _, name = spec.rpartition(":")

    def make(**kw):
        torch.manual_seed(0)
        if source == "torchvision":
            return torchvision.models.get_model(name, weights=None, num_classes=10, **kw)
        return timm.create_model(name, num_classes=10, **kw)

    def runs(m, side):
        try:
            with torch.no_grad():
                m.train()(torch.randn(2, 3, side, side))
            return True
        except Exception:
            return False

    m = make()
    if runs(m, SIDE):
        return make, m, SIDE
    if source != "torchvision":
        try:
            small = make(img_size=SIDE)
            if runs(small, SIDE):
                return (lambda: make(img_size=SIDE)), small, SIDE
        except Exception:
            pass
    return make, m, m.pretrained_cfg["input_size"][-1]


def first_last(model: nn.Module) -> list[str]:
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    return [names[0], names[-1]] if names else []


def convert_brevitas(model: nn.Module) -> nn.Module:
    import brevitas.nn as qnn
    from brevitas.graph.quantize import layerwise_quantize
    from brevitas.quant.binary import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    binary = {"weight_quant": SignedBinaryWeightPerTensorConst, "input_quant": SignedBinaryActPerTensorConst,
              "return_quant_tensor": False}
    layer_map = {nn.Conv1d: (qnn.QuantConv1d, binary), nn.Conv2d: (qnn.QuantConv2d, binary),
                 nn.Linear: (qnn.QuantLinear, binary)}
    return layerwise_quantize(model, compute_layer_map=layer_map, name_blacklist=first_last(model))


def convert_bnn(model: nn.Module) -> nn.Module:
    from bnn import BConfig, prepare_binary_model
    from bnn.ops import BasicInputBinarizer, BasicScaleBinarizer, XNORWeightBinarizer

    bconfig = BConfig(activation_pre_process=BasicInputBinarizer, activation_post_process=BasicScaleBinarizer,
                      weight_pre_process=XNORWeightBinarizer.with_args(center_weights=True))
    return prepare_binary_model(model, bconfig, custom_config_layers_name={n: BConfig() for n in first_last(model)})


def convert_bnn_lab(model: nn.Module) -> nn.Module:
    from bnn.wrapper import wrap_conv_modules, wrap_model

    keep = first_last(model)
    model, _ = wrap_model(model, mode="binary_xnor", policy="aggressive", exclude_exact=keep, skip_attn=False)
    model, _ = wrap_conv_modules(model, skip_name_substr=tuple(keep) or ("\0",))
    return model


CONVERT = {"brevitas": convert_brevitas, "bnn": convert_bnn, "bnn-lab": convert_bnn_lab}


def outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in outputs(o)] if isinstance(out, (tuple, list)) else []


def check(tool: str, spec: str) -> dict:
    from safetensors.torch import load_file, save_file

    rec = {"model": spec, "tool": tool, "status": "fail", "stage": "create", "reason": ""}
    t0 = time.perf_counter()
    stage = "create"
    try:
        make, model, side = build(spec)
        stage = "convert"
        net = CONVERT[tool](model)
        stage = "train"
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        rec["trainable"] = sum(p.numel() for p in params)  # bnn-lab's packed layers hold no trainable weight
        loss = sum(t.float().pow(2).mean() for t in outputs(net(torch.randn(2, 3, side, side))))
        loss.backward()
        if not all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
            raise RuntimeError("non-finite gradient")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.optim.SGD(params, lr=1e-3).step()
        net.eval()
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "model.safetensors")
            state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
            save_file(state, path)
            stage = "reload"
            fresh = CONVERT[tool](make())
            tensors = OrderedDict(load_file(path))
            tensors._metadata = getattr(fresh.state_dict(), "_metadata", None)  # safetensors drops module versions
            fresh.load_state_dict(tensors, strict=True)
        stage = "compare"
        x = torch.randn(1, 3, side, side)
        with torch.no_grad():
            diff = max(float((a - b).abs().max()) for a, b in zip(outputs(net(x)), outputs(fresh.eval()(x))))
        if not diff <= 1e-5:
            raise RuntimeError(f"reloaded model differs by {diff:.3g}")
        rec.update(status="ok", stage="", reason="")
    except Exception as exc:
        rec.update(stage=stage, reason=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def main() -> None:
    tool = sys.argv[1]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    results = []
    for spec in FAST:
        rec = check(tool, spec)
        print(f"{tool} {rec['status']:<4} {spec} {rec['seconds']:.1f}s {rec['stage']} {rec['reason'][:120]}",
              file=sys.stderr, flush=True)
        results.append(rec)
    out = HERE / "results"
    _write(out / f"zoo_peers_{tool}.json", json.dumps(results, indent=1) + "\n")
    summary_file = out / "zoo_peers.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    summary[tool] = {"fast": [len(results), sum(r["status"] == "ok" for r in results)]}
    _write(summary_file, json.dumps(summary, indent=1) + "\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
