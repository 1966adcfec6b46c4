"""The plan: Policy precedence (global, type, structure, pattern, name), fan-in and depthwise rules, bad values."""

import pytest
import timm
import torch

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
        elif f.feature:  # conv_head, which the classifier reads through its BatchNorm and pooling
            assert name == "conv_head" and lp.mode == "W1A32"
        else:
            assert lp.mode == "W1A1", name


def test_w1a1_layers_under_the_fan_in_floor_become_w1a32_and_patterns_still_win():
    model = timm.create_model("mobilenetv2_100")
    a = analyze(model)
    base = irconvert.binarize(model).irconvert_plan.layers
    narrow = irconvert.binarize(model, w1a1_min_fan_in=100, patterns={"blocks.1.0.conv_pw": "W1A1"}).irconvert_plan.layers
    hits = [n for n, lp in base.items() if lp.mode == "W1A1" and a.layers[n].fan_in < 100]
    assert len(hits) > 2  # the early expand convs read 16-32 channels
    for name, lp in base.items():
        if name == "blocks.1.0.conv_pw":
            assert narrow[name].mode == "W1A1"  # a pattern overrides the structure rule
        elif name in hits:
            assert narrow[name].mode == "W1A32" and "w1a1_min_fan_in 100" in narrow[name].reason, name
        else:
            assert narrow[name].mode == lp.mode, name  # kept, W1A32 and wide W1A1 layers as before


def test_bad_policy_values_are_rejected():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        irconvert.Policy(method="nope")
    with pytest.raises(ValueError, match="keep_frist"):
        irconvert.Policy(keep_frist=True)
    with pytest.raises(ValueError, match="not a valid regex"):
        irconvert.Policy(patterns={"re:(": "keep"})


@pytest.mark.slow  # about 8 s: three zoo models
def test_the_classifiers_feature_layer_is_w1a32_by_default():
    import torchvision

    class Gap(torch.nn.Module):  # a sum with a shortcut in front of the head: no feature layer
        def __init__(self):
            super().__init__()
            self.stem, self.conv = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(8)
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            x = self.stem(x)
            return self.head((x + self.bn(self.conv(x))).mean((2, 3)))

    cases = [(timm.create_model("efficientnet_b0", num_classes=10), "conv_head"),  # BN+act, pool, classifier
             (torchvision.models.mobilenet_v3_small(num_classes=10), "classifier.0"),  # pool, flatten, Linear
             (timm.create_model("resnet18", num_classes=10), None), (Gap(), None)]
    for model, feature in cases:
        a = analyze(model)
        assert [n for n, f in a.layers.items() if f.feature] == ([feature] if feature else [])
        for features, mode in (("W1A32", "W1A32"), ("keep", None), ("binary", "W1A1")):
            layers = irconvert.binarize(model, features=features, calibrate=False).irconvert_plan.layers
            assert all(lp.mode == "W1A1" for n, lp in layers.items() if n != feature and lp.reason == "global")
            if feature:
                assert layers[feature].mode == mode and (features == "binary") == (layers[feature].reason == "global")
    patterned = irconvert.binarize(cases[0][0], patterns={"conv_head": "binary"}, calibrate=False).irconvert_plan
    assert patterned.layers["conv_head"].mode == "W1A1"  # a pattern beats the structure rule
    with pytest.raises(Exception, match="features"):
        irconvert.Policy(features="sometimes")
