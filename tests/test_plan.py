"""The plan: Policy precedence (global, type, structure, pattern, name), fan-in and depthwise rules, bad values."""

import pytest
import timm

import irconvert
from irconvert.analyze import analyze


def test_policy_precedence_global_type_structure_pattern_name():
    model = timm.create_model("resnet18")
    policy = irconvert.Policy(
        mode="W1A32",
        types={"Conv2d": "W1A1"},
        patterns={"layer4.*": "keep", "layer4.1.*": "binary", "re:layer3\\.0\\.conv\\d": "keep"},
        layers={"layer4.1.conv2": "keep", "fc": "W1A32"},
    )
    b = irconvert.binarize(model, policy)
    decided = b.irconvert_plan.layers
    assert decided["layer1.0.conv1"].mode == "W1A1"  # type beats global
    assert decided["conv1"].mode is None  # structure (first) beats type
    assert decided["layer4.0.conv1"].mode is None  # pattern beats type
    assert decided["layer4.1.conv1"].mode == "W1A32"  # the later pattern wins; 'binary' = global mode
    assert decided["layer3.0.conv1"].mode is None and decided["layer3.1.conv1"].mode == "W1A1"
    assert decided["layer4.1.conv2"].mode is None  # exact name beats pattern
    assert decided["fc"].mode == "W1A32"  # exact name beats structure (last)


def test_min_fan_in_and_binarize_depthwise():
    model = timm.create_model("mobilenetv2_100")
    a = analyze(model)
    b = irconvert.binarize(model, keep_depthwise=False, min_fan_in=100)
    for name, lp in b.irconvert_plan.layers.items():
        f = a.layers[name]
        if f.first or f.last or f.fan_in < 100:
            assert lp.mode is None
        else:
            assert lp.mode == "W1A1", name


def test_bad_policy_values_are_rejected():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        irconvert.Policy(method="nope")
    with pytest.raises(ValueError, match="keep_frist"):
        irconvert.Policy(keep_frist=True)
    with pytest.raises(ValueError, match="not a valid regex"):
        irconvert.Policy(patterns={"re:(": "keep"})
