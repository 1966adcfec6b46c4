"""Stage 1, load the model: build a timm or torchvision model, with weights from the hub or a local file.

One function, `create_model`, is the only build path, and `_weights_source` the one place that
decides where weights come from:
    pretrained=False                      random init
    pretrained=True                       the hub (timm's or torchvision's default weights; needs internet)
    pretrained=PATH or weights=PATH       a local file: .safetensors, or a torch checkpoint read with
                                          weights_only=True (never unpickled)
For timm models a local file goes through timm's own mechanism (pretrained_cfg_overlay=dict(file=...)),
so timm adapts the classifier to num_classes and the stem to in_chans exactly as for hub weights.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .errors import IRConvertError, flag
from .graph import last_layers, trace

SOURCES = ("timm", "torchvision")
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"  # the models irconvert ships, NAME.safetensors + NAME.json


def split_name(name: str, source: str | None = None) -> tuple[str, str]:
    """Return (source, model name) from 'torchvision:resnet18', 'timm:resnet18' or a plain timm name."""
    if ":" in name:
        prefix, _, rest = name.partition(":")
        if prefix in SOURCES:
            return prefix, rest
    return source or "timm", name


def check_name(name: str, source: str | None = None) -> None:
    """Refuse a model name that neither library knows, with the close names (a torchvision name given
    without its prefix, or the other way round, named as such); builds nothing."""
    import timm
    import torchvision

    source, name = split_name(name, source)
    tv = torchvision.models.list_models(module=torchvision.models)
    if source == "timm" and not timm.is_model(name):
        hint = (f"; did you mean torchvision:{name}?" if name in tv else
                _suggest(name, timm.list_models()) or _suggest(name, tv).replace("mean ", "mean torchvision:"))
        raise IRConvertError(f"model.name: unknown timm model {name!r}{hint}")
    if source == "torchvision" and name not in tv:
        hint = f"; did you mean the timm model {name!r} (no prefix)?" if timm.is_model(name) else _suggest(name, tv)
        raise IRConvertError(f"model.name: unknown torchvision classifier {name!r}{hint}")


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def state_dict_problem(text: str, limit: int = 3) -> str:
    """Return torch's load_state_dict error `text` as one short line: which tensors do not fit and how
    ('fc.weight: file [10, 128], model [1000, 128]; missing: a, b; and 4 more'), never cut inside a word."""
    shapes = re.findall(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                        r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)", text)
    parts = [f"{k}: file {a}, model {b}" for k, a, b in shapes]
    for line in text.splitlines():  # torch writes one line per kind of problem
        for label in ("missing", "unexpected"):
            if line.strip().startswith(f"{label.capitalize()} key(s)"):
                keys = re.findall(r'"([^"]+)"', line)
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
    if not parts:  # another wording: its first sentence, whole words only
        words = " ".join(text.split())
        return words if len(words) <= 200 else words[:200].rsplit(" ", 1)[0] + " ..."
    more = len(parts) - limit
    return "; ".join(parts[:limit]) + (f"; and {more} more" if more > 0 else "")


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Return the tensors of a .safetensors file or a weights-only torch checkpoint (never unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise IRConvertError(f"{path}: weights file not found; pass an existing .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file pickles Python objects
        raise IRConvertError(f"{path}: holds pickled Python objects, which irconvert never unpickles; "
                             "save model.state_dict() with torch.save, or use a .safetensors file") from None
    except Exception as exc:
        raise IRConvertError(f"{path}: cannot read weights ({str(exc).splitlines()[0][:160]}); "
                             "use a .safetensors file or a torch state_dict saved with torch.save") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise IRConvertError(f"{path}: holds no state_dict of tensors; save model.state_dict() instead")
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str, head: tuple[str, ...] = ()) -> nn.Module:
    """Load `state` into `model`; tensors of the `head` modules that do not fit are left at init."""
    own = model.state_dict()
    skipped = [k for k in state if k in own and own[k].shape != state[k].shape and k.rpartition(".")[0] in head]
    state = {k: v for k, v in state.items() if k not in skipped}
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
        raise IRConvertError(f"{origin}: weights do not fit the model ({'; '.join(parts)}); "
                             "check the model name and its kwargs (num_classes, in_chans)")
    model.load_state_dict(state, strict=False)
    return model


def _weights_source(pretrained: Union[bool, str, os.PathLike, None], weights: Union[str, os.PathLike, None]):
    """Return None (random init), 'hub', or a local Path: the one place that decides."""
    if weights is not None:
        return Path(weights)
    if pretrained is True:
        return "hub"
    if pretrained:
        return Path(pretrained)
    return None


def create_model(
    name: str,
    source: str | None = None,
    pretrained: Union[bool, str, os.PathLike, None] = False,
    weights: Union[str, os.PathLike, None] = None,
    adapt: Optional[dict] = None,
    **kwargs: Any,
) -> nn.Module:
    """Return the model `name` (timm by default, 'torchvision:' prefix or source='torchvision').

    `adapt` holds the input fixes of `adapt_input` (in_chans, first_stride, stem_pool), applied
    after the weights are loaded; kwargs go to the model's constructor.
    """
    source, name = split_name(name, source)
    where = _weights_source(pretrained, weights)
    if isinstance(where, Path) and not where.is_file():
        raise IRConvertError(f"{where}: weights file not found; pass an existing .safetensors or .pth file")
    if source == "timm":
        model = _create_timm(name, where, kwargs)
    elif source == "torchvision":
        model = _create_torchvision(name, where, kwargs)
    else:
        raise IRConvertError(f"model.source: unknown source {source!r}; use one of {', '.join(SOURCES)}")
    adapt = {k: v for k, v in (adapt or {}).items() if v is not None}
    adapt_input(model, **adapt)
    # what the exporter writes so that a file can rebuild the architecture without this call
    model.irconvert_origin = {"name": name, "source": source, "kwargs": dict(kwargs), "adapt": adapt}
    return model


def list_pretrained() -> list[str]:
    """Return the names of the pretrained models shipped with irconvert (for `pretrained(name)`)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors") if p.with_suffix(".json").is_file())


def pretrained(name: str = "fashion-mnist-resnet18-w16") -> nn.Module:
    """Return the shipped pretrained model `name`, built from its .json record and its weights, offline.

    The record (written by bench/pretrain.py) names the timm architecture, its stage widths, classes,
    input channels and stem fixes; the model goes through `create_model` like any recipe's model, so
    it converts, packs and reloads the same way.
    """
    names = list_pretrained()
    if name not in names:
        raise IRConvertError(f"pretrained: no shipped model {name!r}{_suggest(name, names)}; "
                             f"the shipped ones are {', '.join(names)}")
    meta = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())
    adapt = {"first_stride": meta.get("first_stride"), "stem_pool": meta.get("stem_pool", True)}
    return create_model(meta["model"], pretrained=PRETRAINED_DIR / f"{name}.safetensors", adapt=adapt,
                        channels=meta["channels"], num_classes=meta["num_classes"], in_chans=meta["in_chans"])


def from_origin(origin: dict) -> nn.Module:
    """Return the architecture (random weights) that a file's or checkpoint's recorded origin names."""
    return create_model(origin["name"], origin["source"], pretrained=False, adapt=origin.get("adapt"),
                        **origin.get("kwargs", {}))


def adapt_input(model: nn.Module, in_chans: Optional[int] = None, first_stride: Optional[int] = None,
                stem_pool: bool = True) -> nn.Module:
    """Fit the stem to other images, in place: input channels (pretrained filters summed or repeated,
    as timm does), the first conv's stride, and (stem_pool=False) no max-pool right after the stem.
    The state_dict keys stay the same, so pretrained weights still load."""
    if in_chans is None and first_stride is None and stem_pool:
        return model
    graph = trace(model)
    convs = [n for n in graph.nodes if n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.Conv2d)]
    if not convs:
        raise IRConvertError(f"model: {type(model).__name__} has no Conv2d stem to adapt")
    stem_node = convs[0]
    stem = model.get_submodule(stem_node.target)
    if in_chans is not None and in_chans != stem.in_channels:
        from timm.models import adapt_input_conv

        with torch.no_grad():
            stem.weight = nn.Parameter(adapt_input_conv(in_chans, stem.weight.detach()))
        stem.in_channels = in_chans
    if first_stride is not None:
        stem.stride = (first_stride,) * len(stem.stride)
    if not stem_pool:
        nodes = list(graph.nodes)
        for n in nodes[nodes.index(stem_node):]:
            if n.op == "call_module" and isinstance(model.get_submodule(n.target), (nn.MaxPool2d,)):
                parent, _, child = n.target.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
                break
            if n is not stem_node and n in convs:
                break
    return model


_NETWORK_MODULES = ("urllib", "requests", "urllib3", "httpx", "httpcore", "huggingface_hub", "socket", "ssl")


@contextmanager
def _hub(name: str) -> Iterator[None]:
    """Turn a failed download of hub weights (no network, no such file on the hub) into one line."""
    try:
        yield
    except Exception as exc:
        mods = {c.__module__.split(".")[0] for c in type(exc).__mro__}
        if not (mods & set(_NETWORK_MODULES) or isinstance(exc, (ConnectionError, TimeoutError))):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise IRConvertError(f"model.pretrained: cannot download the hub weights of {name!r} ({type(exc).__name__}: "
                             f"{first}); without network pass a local file: {flag('weights')} or model.pretrained: PATH") from None


def _create_timm(name: str, where, kwargs: dict) -> nn.Module:
    import timm

    check_name(name, "timm")
    try:
        if where is None:
            return timm.create_model(name, pretrained=False, **kwargs)
        if where == "hub":
            with _hub(name):
                return timm.create_model(name, pretrained=True, **kwargs)
        overlay = dict(file=str(where), **_file_overlay(name, read_state_dict(where)))
        with _timm_load_report() as report:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        _refuse_partial_load(model, report, where, name)
        return model
    except IRConvertError:
        raise
    except TypeError as exc:
        raise IRConvertError(f"model.kwargs: timm model {name!r} rejects its arguments ({exc})") from None
    except RuntimeError as exc:
        if "state_dict" in str(exc) or "size mismatch" in str(exc):
            raise IRConvertError(f"{where}: weights do not fit timm model {name!r} ({state_dict_problem(str(exc))}); "
                                 "check the model name "
                                 f"and its kwargs, or {flag('set', 'model.pretrained=false')} to start from random "
                                 "weights") from None
        raise


@contextmanager
def _timm_load_report() -> Iterator[dict[str, list[str]]]:
    """Collect the keys timm reports as missing or unexpected while it loads weights non-strictly
    (it does so whenever it adapts the head or the stem, and then only logs what did not fit)."""
    report: dict[str, list[str]] = {"missing": [], "unexpected": []}

    class _Keys(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            for label in report:
                if msg.startswith(f"{label.capitalize()} keys ("):
                    report[label] += msg[len(label) + 7:].partition(")")[0].split(", ")

    logger, handler = logging.getLogger("timm.models._builder"), _Keys(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        yield report
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _refuse_partial_load(model: nn.Module, report: dict[str, list[str]], where, name: str) -> None:
    """Raise unless the only keys timm could not load are the classifier's it dropped on purpose
    (the file was made for another number of classes)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    missing = [k for k in report["missing"] if k.rpartition(".")[0] not in heads]
    unexpected = report["unexpected"]
    if missing or unexpected:
        parts = [f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise IRConvertError(f"{where}: weights do not fit timm model {name!r} ({'; '.join(parts)}); "
                             f"check the model name and its kwargs, or {flag('set', 'model.pretrained=false')} to start from "
                             "random weights")


def _file_overlay(name: str, state: dict[str, torch.Tensor]) -> dict:
    """Tell timm the classes and input channels the file was made for, so that it adapts the head
    and stem only where they differ from the model asked for (a file fine-tuned on 10 grey classes
    keeps its head when the model has 10 classes)."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    over = {}
    classifier = cfg.get("classifier")
    head = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if head is not None:
        over["num_classes"] = int(head.shape[0])
        over["label_offset"] = 0
    first = cfg.get("first_conv")
    stem = state.get(f"{first}.weight") if isinstance(first, str) else None
    if stem is not None and stem.dim() == 4:
        size = tuple(cfg.get("input_size") or (3, 224, 224))
        over["input_size"] = (int(stem.shape[1]),) + size[1:]
    return over


def _create_torchvision(name: str, where, kwargs: dict) -> nn.Module:
    import torchvision

    check_name(name, "torchvision")
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as exc:
        raise IRConvertError(f"model.kwargs: torchvision model {name!r} rejects its arguments ({exc})") from None
    if where is None:
        return model
    if where == "hub":
        enum = torchvision.models.get_model_weights(name)
        with _hub(name):
            state = enum.DEFAULT.get_state_dict(progress=True)
        origin = f"torchvision hub weights {enum.DEFAULT}"
    else:
        state, origin = read_state_dict(where), str(where)
    return load_weights(model, state, origin, head=_head_names(model))


def _head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the classifier layers (the last conv/linear by graph), whose shape num_classes may change."""
    return last_layers(model)


def zoo_verified() -> dict[str, dict]:
    """Return what the model-zoo sweep verified per model name ('resnet18', 'torchvision:resnet18'):
    irconvert/zoo_verified.json, which `python -m bench.zoo_verified` writes from bench/results."""
    import json

    return json.loads((Path(__file__).with_name("zoo_verified.json")).read_text())["models"]


def list_models(pattern: str = "", source: Optional[str] = None, verified: bool = False) -> list[dict]:
    """Return the models irconvert can load whose name matches the fnmatch `pattern` (timm's wildcards;
    torchvision ones named 'torchvision:NAME', matched with or without the prefix), each with what the
    zoo sweep verified (None: not in the sweep)."""
    import fnmatch

    import timm
    import torchvision

    pattern = pattern or "*"
    names = []
    if source in (None, "timm"):
        names += timm.list_models(pattern.removeprefix("timm:"))
    if source in (None, "torchvision"):
        bare = pattern.removeprefix("torchvision:")
        names += [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)
                  if fnmatch.fnmatchcase(n, bare)]
    zoo = zoo_verified()
    rows = [{"name": n, "zoo": zoo.get(n)} for n in names]
    return [r for r in rows if r["zoo"] is not None] if verified else rows
