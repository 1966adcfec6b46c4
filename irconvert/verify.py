"""Stage 8, verify: rebuild a model from a written file and check it reproduces the trained one.

`load_packed(path)` rebuilds from packed.safetensors alone: the architecture from the metadata
(model name, source, kwargs), or for a user model saved with embed=True from the NAME.arch.pt2 beside it
(embed.py), the binary layers from the stored plan, their weights s * B from the
packed bits, scales and input thresholds (frozen: the layer uses them as they are). `load(path)` rebuilds the
latent, trainable model from model.safetensors. Both give the trained model's eval outputs.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from pydantic import ValidationError
from torch import nn

from .attention import prepare_attention
from .embed import load_architecture
from .errors import IRConvertError, flag
from .fileformat import LATENT_FORMAT, PACKED_FORMAT, packed_in, read
from .layer_summary import default_input_size, summary
from .layers import BinaryMixin
from .models import from_origin, state_dict_problem
from .ops import input_channels
from .pack import binary_weight
from .plan import LayerPlan, Plan, Policy
from .swap import fuse_hardtanh, swap
from .version import __version__



def _skeleton(meta: dict[str, str], path, model: Optional[nn.Module]) -> nn.Module:
    """Return the unbinarized architecture: `model` if given, else built from the metadata."""
    policy = _policy(meta, path)
    try:
        origin = json.loads(meta.get("model") or "null")
        decisions = json.loads(meta["plan"])
        gains = json.loads(meta.get("gain") or "{}")  # absent in files written before the gain existed
        scales = json.loads(meta.get("grad_scale") or "{}")  # absent before calibration existed
        hardtanh = tuple(json.loads(meta["hardtanh"]))
        shortcuts = tuple(tuple(p) for p in json.loads(meta.get("shortcuts") or "[]"))
        rprelu = {n: tuple(int(v) for v in s) for n, s in json.loads(meta.get("rprelu") or "{}").items()}
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise IRConvertError(f"{path}: metadata is incomplete or invalid ({exc}); export it again") from None
    if model is None:
        model = _architecture(meta, path, origin)
    elif any(isinstance(m, BinaryMixin) for m in model.modules()):
        raise IRConvertError("load: pass the unconverted architecture as model=, not a binarized one")
    try:
        layers = {n: LayerPlan(n, mode, "from file", int(gains.get(n, 0)), float(scales.get(n, 1.0)))
                  for n, mode in decisions.items()}
        prepare_attention(model)  # nn.MultiheadAttention's projections are layers of the plan
        for n in layers:
            try:
                model.get_submodule(n)
            except AttributeError:
                raise _Misfit(f"{path}: its layer {n} is not in this architecture") from None
        return swap(model, Plan(policy=policy, layers=layers, hardtanh=hardtanh, warnings=(), shortcuts=shortcuts,
                                rprelu=rprelu))
    except AttributeError as exc:
        raise _Misfit(f"{path}: its layers do not fit this architecture ({exc})") from None


def _policy(meta: dict[str, str], path) -> Policy:
    """Return the policy a file's metadata records; a policy with fields this version does not know (a
    newer irconvert's options) is an error that names them and the version that wrote the file."""
    try:
        return Policy.model_validate_json(meta["policy"])
    except KeyError:
        raise IRConvertError(f"{path}: metadata has no 'policy' entry; export it again") from None
    except ValidationError as exc:
        errors = exc.errors()
        unknown = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
        if unknown and len(unknown) == len(errors):
            raise IRConvertError(f"{path}: its policy has fields this irconvert {__version__} does not know "
                                 f"({', '.join(unknown)}): it was written by irconvert "
                                 f"{meta.get('irconvert_version', '?')}; read it with that version or newer") from None
        raise IRConvertError(f"{path}: metadata 'policy' is invalid ({errors[0]['msg']}); export it again") from None


def _architecture(meta: dict[str, str], path, origin: Optional[dict]) -> nn.Module:
    """Return the architecture a file names (its origin) or embeds (NAME.arch.pt2 beside it)."""
    if origin:
        return from_origin(origin)
    if meta.get("architecture"):
        try:
            entry = json.loads(meta["architecture"])
        except ValueError:
            raise IRConvertError(f"{path}: metadata 'architecture' is not valid JSON; export it again") from None
        return load_architecture(entry, Path(path))
    raise IRConvertError(f"{path}: made from a user model with no registered name; pass the unconverted "
                         "architecture: load_packed(path, model=MyNet()), or save with save_packed(..., embed=True)")


class _Misfit(IRConvertError):
    """The architecture does not fit the file (a layer, a shape): with model= given, the skeleton is wrong."""


def _expected(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """Return what architecture a file expects, in words: its origin, else a few of its layers."""
    try:
        origin = json.loads(meta.get("model") or "null")
    except ValueError:
        origin = None
    if origin:
        args = ", ".join([repr(origin["name"])] + [f"{k}={v!r}" for k, v in origin.get("kwargs", {}).items()]
                         + ([f"adapt={origin['adapt']!r}"] if origin.get("adapt") else []))
        return (f"{origin['source']} {origin['name']} as create_model({args}) builds it; leave model= out "
                "and the file builds it itself")
    layers = [f"{k.removesuffix('.weight.bits')}" for k in tensors if k.endswith(".weight.bits")][:3]
    return f"the model it was saved from (binary layers {', '.join(layers)} ...)"


@contextmanager
def _fitting(path, meta: dict[str, str], tensors: dict[str, torch.Tensor], model: Optional[nn.Module]):
    """Turn any misfit of a model= skeleton (a missing module, a shape) into one line saying that the
    skeleton does not match and what the file expects."""
    if model is None:
        yield
        return
    try:
        yield
    except (_Misfit, AttributeError, RuntimeError, KeyError) as exc:
        detail = state_dict_problem(str(exc)) if isinstance(exc, RuntimeError) else str(exc).removeprefix(f"{path}: ")
        raise IRConvertError(f"{path}: model= is not the architecture this file was made from ({detail}); the file "
                             f"expects {_expected(meta, tensors)}") from None


def load(path: os.PathLike | str, model: Optional[nn.Module] = None) -> nn.Module:
    """Return the binarized, trainable model stored in model.safetensors (latent weights), with the Hardtanh
    modules that only W1A1 layers read fused into their sign, as `binarize` leaves them: training it costs the
    memory training the converted model did."""
    tensors, meta = read(path, LATENT_FORMAT)
    with _fitting(path, meta, tensors, model):
        net = rebuild(meta, path, tensors, model)
    net.irconvert_input_size = stored_input_size(meta)  # a re-export keeps it
    return net


def rebuild(meta: dict[str, str], path, state: dict[str, torch.Tensor], model: Optional[nn.Module] = None) -> nn.Module:
    """Return the trainable binarized model that metadata `meta` (fileformat.describe) describes, holding the
    latent `state`; `path` names where both came from in errors."""
    net = _skeleton(meta, path, model)
    _load_strict(net, state, path)
    fuse_hardtanh(net, net.irconvert_plan)
    return net


def stored_input_size(meta: dict[str, str]) -> Optional[tuple[int, ...]]:
    """Return the input size (C, H, W) a file's metadata records, or None (files made without one)."""
    try:
        size = tuple(int(v) for v in json.loads(meta.get("input_size") or "[]"))
    except (TypeError, ValueError):
        return None
    return size if len(size) == 3 else None


def load_packed(path: os.PathLike | str, model: Optional[nn.Module] = None) -> nn.Module:
    """Return the deployment model rebuilt from packed.safetensors alone (binary weights frozen to s*B)."""
    tensors, meta = read(path, PACKED_FORMAT)
    with _fitting(path, meta, dict(tensors), model):
        return _packed_model(tensors, meta, path, model)


def _packed_model(tensors: dict[str, torch.Tensor], meta: dict[str, str], path, model: Optional[nn.Module]) -> nn.Module:
    """Return the frozen deployment model of a packed file's tensors and metadata (see load_packed)."""
    net = _skeleton(meta, path, model)
    try:
        layers = json.loads(meta["layers"])
    except (KeyError, ValueError):
        raise IRConvertError(f"{path}: metadata has no valid 'layers' entry; export it again") from None
    for name, m in net.named_modules():
        if not isinstance(m, BinaryMixin):
            continue
        try:
            bits = tensors.pop(f"{name}.weight.bits")
            scale = tensors.pop(f"{name}.weight.exp", None)
            scale = tensors.pop(f"{name}.weight.scale") if scale is None else scale
            threshold = tensors.pop(f"{name}.input.threshold", None)
            shape = tuple(layers[name]["shape"])
            w = binary_weight(bits, scale, shape)
        except (KeyError, RuntimeError) as exc:
            raise IRConvertError(f"{path}: packed weight of layer {name} is missing or malformed ({exc})") from None
        if w.shape != m.latent_weight.shape:
            raise _Misfit(f"{path}: layer {name} has shape {tuple(w.shape)}, model expects "
                                 f"{tuple(m.latent_weight.shape)}")
        channels = input_channels(m)
        if threshold is not None and (m.binary_mode != "W1A1" or threshold.shape != (channels,)):
            raise IRConvertError(f"{path}: layer {name} has an input threshold of shape {tuple(threshold.shape)}; "
                                 f"a {m.binary_mode} layer with {channels} input channels cannot use it")
        m.freeze(w, threshold)
        tensors[f"{name}.weight"] = m._parameters["weight"].data
    _load_strict(net, tensors, path)
    net.irconvert_input_size = stored_input_size(meta)
    return net.eval()


def _load_strict(net: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    # safetensors keeps no state_dict metadata; modules that check their saved version when loading
    # (torchvision's MNASNet) get the versions of the architecture just built, which wrote the file
    tensors = OrderedDict(tensors)
    tensors._metadata = getattr(net.state_dict(), "_metadata", None)
    result = net.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise _Misfit(f"{path}: tensors do not fit the model (missing: {result.missing_keys[:3]}, "
                             f"unexpected: {result.unexpected_keys[:3]}); export it again")


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Return max |a(x) - b(x)| in eval mode (outputs flattened over tuples)."""
    was = a.training, b.training
    a.eval(), b.eval()
    try:
        ya, yb = a(x), b(x)
    finally:
        a.train(was[0]), b.train(was[1])
    ya = ya if isinstance(ya, (tuple, list)) else [ya]
    yb = yb if isinstance(yb, (tuple, list)) else [yb]
    return max(float((p - q).abs().max()) for p, q in zip(ya, yb))


def verify_file(packed: os.PathLike | str, latent: Optional[os.PathLike | str] = None, batch: int = 2) -> dict:
    """Rebuild `packed`, compare it with the latent model (model.safetensors beside it by default)
    on random input, and return the size figures and the max abs difference (None without a latent file);
    `packed` may be a run folder."""
    packed = packed_in(packed)
    if latent is not None and not Path(latent).is_file():
        raise IRConvertError(f"{flag('latent', label=True)} {latent}: file not found; pass the model.safetensors to "
                             f"compare with, or leave {flag('latent', label=True)} out to use the one beside the packed file")
    net = load_packed(packed)
    size_in = net.irconvert_input_size or default_input_size(net)
    latent = Path(latent) if latent else packed.with_name("model.safetensors")
    diff = None
    if latent.is_file():
        x = torch.randn((batch,) + size_in, generator=torch.Generator().manual_seed(0))
        diff = max_abs_diff(load(latent), net, x)
    s = summary(net, size_in)
    return {"summary": s, "max_abs_diff": diff, "packed": str(packed), "latent": str(latent) if latent.is_file() else None,
            "packed_bytes": packed.stat().st_size, "latent_bytes": latent.stat().st_size if latent.is_file() else None}
