"""Where a model came from: the name and constructor arguments that rebuild its architecture, so that
a packed file stands on its own (`load_packed(path)` without `model=`).

A model built by `irconvert.models.create_model` carries its origin already. For one built directly:
- timm: `pretrained_cfg["architecture"]` names it; the constructor arguments that differ from the
  architecture's defaults are read back from the attributes timm keeps (`num_classes`, the stem's
  input channels, `global_pool`, the patch embedding's `img_size`);
- torchvision: the builder is the one in the model class's own module whose architecture, built
  with the same `num_classes` (and `aux_logits`), has the same tensors.
Either way the candidate is built on the meta device (no memory, no weights) and kept only if its
state_dict has exactly the model's keys and shapes; otherwise the origin is None and loading needs
the architecture passed in.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

_SIDES = (32, 64, 96, 112, 128, 160, 192, 224, 256, 288, 320, 384, 448, 512)
Origin = dict[str, Any]  # {"name", "source", "kwargs", "adapt"}: the arguments of create_model


def infer_origin(model: nn.Module) -> Optional[Origin]:
    """Return the origin of `model` (its own, else inferred for timm / torchvision), or None."""
    origin = getattr(model, "irconvert_origin", None)
    if origin:
        return origin
    cfg = getattr(model, "pretrained_cfg", None)
    try:
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return _timm_origin(model, str(cfg["architecture"]))
        if type(model).__module__.startswith("torchvision.models."):
            return _torchvision_origin(model)
    except Exception:  # an origin we cannot establish is no origin; the file then needs model=
        return None
    return None


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _on_meta(build: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """Return build() with its parameters on the meta device (no memory), or None if it fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return build()
        except Exception:
            pass
        try:  # builders that compute with tensors (torchvision's RegNet widths) need real ones
            with _parameters_on_meta():
                return build()
        except Exception:
            return None


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter to the meta device as it is registered: one layer's memory at a time."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param if param is None else nn.Parameter(param.detach().to("meta"), param.requires_grad))

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _timm_settings(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments timm leaves readable on a built model."""
    out: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        out["num_classes"] = model.num_classes
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    try:
        stem = model.get_submodule(first) if isinstance(first, str) else None
    except AttributeError:
        stem = None
    stem = stem if isinstance(stem, nn.modules.conv._ConvNd) else next(
        (m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if stem is not None:
        out["in_chans"] = stem.in_channels
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)
    if isinstance(pool, str):
        out["global_pool"] = pool
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        out["img_size"] = size[0] if size[0] == size[1] else list(size)
    return out


def _timm_origin(model: nn.Module, arch: str) -> Optional[Origin]:
    import timm

    if not timm.is_model(arch):
        return None
    default = _on_meta(lambda: timm.create_model(arch))
    if default is None:
        return None
    base = _timm_settings(default)
    kwargs = {k: v for k, v in _timm_settings(model).items() if base.get(k) != v}
    want = _shapes(model)
    # a model built for another image size that keeps no img_size attribute (LeViT's attention
    # biases, ...) shows it only in its shapes: try the usual sizes
    trials = [kwargs] + ([dict(kwargs, img_size=side) for side in _SIDES] if "img_size" not in kwargs else [])
    for kw in trials:
        rebuilt = default if not kw else _on_meta(lambda: timm.create_model(arch, **kw))
        if rebuilt is not None and _shapes(rebuilt) == want:
            return {"name": arch, "source": "timm", "kwargs": kw, "adapt": {}}
        if rebuilt is None and kw is not kwargs:
            return None  # the architecture takes no img_size
    return None


def _torchvision_origin(model: nn.Module) -> Optional[Origin]:
    import torchvision

    module = type(model).__module__
    want = _shapes(model)
    for name in torchvision.models.list_models(module=torchvision.models):
        if torchvision.models.get_model_builder(name).__module__ != module:
            continue
        for kwargs in _torchvision_trials(name, want):
            rebuilt = _on_meta(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
            if rebuilt is not None and _shapes(rebuilt) == want:
                return {"name": name, "source": "torchvision", "kwargs": kwargs, "adapt": {}}
    return None


def _torchvision_trials(name: str, want: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Constructor arguments to try: the defaults, then the classes of the model's head."""
    import torchvision

    default = _on_meta(lambda: torchvision.models.get_model(name, weights=None))
    if default is None:
        return []
    have = _shapes(default)
    # the head is the tensors whose first dimension differs from the default's 1000 classes
    classes = {want[k][0] for k in have if k in want and have[k] != want[k] and have[k][0] == 1000}
    trials: list[dict[str, Any]] = [{}] if not classes else [{"num_classes": c} for c in classes]
    if set(want) != set(have) and any(k.startswith("aux") for k in have):
        trials += [dict(t, aux_logits=False) for t in trials]
    return trials
