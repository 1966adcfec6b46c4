"""The model lists of the zoo sweep (bench/zoo.py) and of tests/test_zoo.py.

    FAST          40 common deployment models, timm names or 'torchvision:' names
    timm_families one model per timm family (family = the module that defines the model)
    torchvision   every torchvision classifier

No irconvert import here, so that the tests and the sweep read the same lists.
"""

from __future__ import annotations

import warnings

# The models people deploy on edge hardware; the test suite converts each of them.
FAST = [
    # timm
    "resnet18", "resnet50", "mobilenetv2_100", "mobilenetv3_small_100", "mobilenetv3_large_100",
    "mobilenetv4_conv_small", "efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t",
    "regnetx_002", "regnety_002", "convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "mobilevit_xxs", "mobilevitv2_050", "repvgg_a0", "mobileone_s0",
    "fastvit_t8", "ghostnet_100", "lcnet_050", "levit_128s", "efficientformer_l1", "edgenext_xx_small",
    "tiny_vit_5m_224", "efficientvit_b0", "densenet121",
    # torchvision
    "torchvision:resnet18", "torchvision:resnet50", "torchvision:mobilenet_v2", "torchvision:mobilenet_v3_small",
    "torchvision:mobilenet_v3_large", "torchvision:efficientnet_b0", "torchvision:regnet_y_400mf",
    "torchvision:shufflenet_v2_x1_0", "torchvision:squeezenet1_1", "torchvision:mnasnet0_5",
    "torchvision:convnext_tiny", "torchvision:googlenet",
]

# A family's first model is replaced by its smallest variant above this many parameters: beyond it a
# create + train step + export + reload no longer fits the per-model time on 2 CPU cores (and the
# largest, 1B+ parameters, not the memory).
MAX_PARAMS = 50_000_000


def torchvision_names() -> list[str]:
    """Return every torchvision classifier as 'torchvision:NAME'."""
    import torchvision

    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def _params_on_meta(name: str) -> int | None:
    """Return the parameter count of timm model `name` built on the meta device (no memory), None if it cannot be built."""
    import timm
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, num_classes=10)
    except Exception:
        return None
    return sum(p.numel() for p in model.parameters())


def timm_families(max_params: int = MAX_PARAMS) -> dict[str, dict]:
    """Return {family: {"model", "first", "params", "why"}}: the first model of each family in
    timm.list_models() order, or the family's smallest non-test model when the first has more than
    `max_params` parameters or cannot be built; "model" is None when no member can be built."""
    import timm
    from timm.models import _registry

    members: dict[str, list[str]] = {}
    for name in timm.list_models():
        members.setdefault(_registry._model_to_module[name], []).append(name)
    out = {}
    for family, names in members.items():
        first = names[0]
        params = _params_on_meta(first)
        if params is not None and params <= max_params:
            out[family] = {"model": first, "first": first, "params": params, "why": "first"}
            continue
        sized = [(p, n) for n in names if not n.startswith("test_") for p in [_params_on_meta(n)] if p is not None]
        sized = sized or [(p, n) for n in names for p in [_params_on_meta(n)] if p is not None]
        if not sized:
            out[family] = {"model": None, "first": first, "params": None, "why": "no member builds"}
            continue
        p, n = min(sized)
        why = "first cannot be built" if params is None else f"first has {params / 1e6:.0f}M parameters"
        why = f"smallest variant ({why})" if n != first else f"first, the smallest variant ({why})"
        out[family] = {"model": n, "first": first, "params": p, "why": why}
    return out
