"""The converter: graph analysis, policy precedence, Hardtanh swap, state_dict compatibility."""

import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import irconvert
from irconvert.analyze import analyze
from irconvert.layers import BinaryMixin

CASES = [
    # (builder, first, last, depthwise count)
    (lambda: timm.create_model("resnet18"), {"conv1"}, {"fc"}, 0),
    (lambda: timm.create_model("mobilenetv2_100"), {"conv_stem"}, {"classifier"}, 17),
    (lambda: timm.create_model("efficientnet_b0"), {"conv_stem"}, {"classifier"}, 16),
    (lambda: timm.create_model("convnext_atto"), {"stem.0"}, {"head.fc"}, 12),
    (lambda: timm.create_model("vit_tiny_patch16_224"), {"patch_embed.proj"}, {"head"}, 0),
    (lambda: torchvision.models.resnet18(), {"conv1"}, {"fc"}, 0),
    (lambda: torchvision.models.mobilenet_v3_small(), {"features.0.0"}, {"classifier.3"}, 11),
    # googlenet in training mode: the two auxiliary classifiers reach the output too
    (lambda: torchvision.models.googlenet(init_weights=False), {"conv1.conv"}, {"fc", "aux1.fc2", "aux2.fc2"}, 0),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_first_last_depthwise_from_graph(case):
    build, first, last, dw = CASES[case]
    model = build()
    a = analyze(model)
    assert a.traced and a.warning is None
    assert {n for n, f in a.layers.items() if f.first} == first
    assert {n for n, f in a.layers.items() if f.last} == last
    assert sum(f.depthwise for f in a.layers.values()) == dw
    b = irconvert.binarize(model)
    kept = {n for n, m in b.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, BinaryMixin)}
    assert first | last <= kept
    assert all(not getattr(b.get_submodule(n), "groups", 1) > 1 or n in kept
               for n, f in a.layers.items() if f.depthwise)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 3)
        self.c = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.relu(self.a(x))
        x = self.b(x) if x.sum() > 0 else self.c(x)  # data-dependent: fx cannot trace this
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_goes_through_fallback_with_warning():
    with pytest.warns(UserWarning, match="Branchy: torch.fx could not trace"):
        b = irconvert.binarize(Branchy())
    assert [n for n, _ in irconvert.binary_layers(b)] == ["b", "c"]
    assert isinstance(b.relu, nn.Hardtanh)
    b(torch.randn(1, 3, 9, 9)).sum().backward()


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(), lambda: timm.create_model("resnet18")])
@pytest.mark.slow
def test_hardtanh_reaches_every_activation_that_feeds_a_binary_layer(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 3, 64, 64)

    def nonneg_inputs(m):
        seen = {}
        hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, bool((a[0] >= 0).all())))
                 for n, mod in irconvert.binary_layers(m)]
        with torch.no_grad():
            m(x)
        for h in hooks:
            h.remove()
        return seen

    without = irconvert.binarize(model, hardtanh=False).eval()
    assert all(nonneg_inputs(without).values())  # behind a ReLU, sign() only ever sees +1
    with_ht = irconvert.binarize(model).eval()
    assert not any(nonneg_inputs(with_ht).values())
    assert not any(isinstance(m, nn.ReLU) for n, m in with_ht.named_modules() if n in with_ht.irconvert_plan.hardtanh)


def test_state_dict_is_compatible_and_original_untouched():
    model = timm.create_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b = irconvert.binarize(model)
    assert not any(isinstance(m, BinaryMixin) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    b.load_state_dict(model.state_dict(), strict=True)
    assert list(b.state_dict()) == list(model.state_dict())
    inplace = irconvert.binarize(model, inplace=True)
    assert inplace is model


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


@pytest.mark.slow
def test_converted_model_trains_and_set_ede_reaches_all_layers():
    b = irconvert.binarize(timm.create_model("resnet18", num_classes=10))
    irconvert.set_ede(b, 0.5)
    layers = list(irconvert.binary_layers(b))
    assert len(layers) == 19 and all(m.ede_t == 0.5 and m.ede_k == 2.0 for _, m in layers)
    out = b(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(m.latent_weight.grad is not None for _, m in layers)


def test_summary_counts_bits_and_macs():
    b = irconvert.binarize(timm.create_model("resnet18"))
    s = irconvert.summary(b)
    row = {r.name: r for r in s.rows}
    assert row["layer1.0.conv1"].binary == "W1A1" and row["conv1"].binary == "fp32"
    # 64 out channels x ceil(576/32)=18 words x 4 bytes + 64 int8 exponents
    assert row["layer1.0.conv1"].bytes == 64 * 18 * 4 + 64
    assert row["layer1.0.conv1"].macs == 56 * 56 * 64 * 576
    assert 0.9 < s.binary_mac_share < 1 and s.compression > 10
    assert "compression" in str(s)


@pytest.mark.slow
def test_bireal_shortcut_adds_the_real_input_after_the_norm(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    plain = irconvert.binarize(model).eval()
    short = irconvert.binarize(model, shortcut=True).eval()
    pairs = dict(short.irconvert_plan.shortcuts)
    assert pairs["layer1.0.conv1"] == "layer1.0.bn1" and pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert len(pairs) == 19 and list(short.state_dict()) == list(model.state_dict())
    # by hand: the block's bn1 output gains the conv's real-valued input (pooled + repeated when downsampling)
    seen = {}
    for name in ("layer1.0.conv1", "layer2.0.conv1"):
        short.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen.__setitem__(n, a[0]))
        short.get_submodule(name.replace("conv1", "bn1")).register_forward_hook(
            lambda m, a, out, n=name: seen.__setitem__(n + ".out", (a[0], out)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        short(x)
    a, out = seen["layer1.0.conv1.out"]
    bn = short.layer1[0].bn1
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps) + seen["layer1.0.conv1"])
    a, out = seen["layer2.0.conv1.out"]
    bn = short.layer2[0].bn1
    pooled = torch.nn.functional.avg_pool2d(seen["layer2.0.conv1"], 2, 2, ceil_mode=True).repeat(1, 2, 1, 1)
    torch.testing.assert_close(out, torch.nn.functional.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps) + pooled)
    assert not torch.allclose(plain(x), short(x))
    irconvert.save_packed(short, tmp_path / "p.safetensors")
    again = irconvert.load_packed(tmp_path / "p.safetensors", model=timm.create_model("resnet18", num_classes=10))
    from irconvert.verify import max_abs_diff

    assert max_abs_diff(short, again, x) == 0.0
    short(x).sum().backward()  # trains


@pytest.mark.slow
def test_gated_shortcut_starts_as_the_plain_model_then_trains_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()  # (a zero bn2 blocks all grads)
    plain = irconvert.binarize(model).eval()
    gated = irconvert.binarize(model, shortcut="gated").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain(x), gated(x))  # every gate is 0: the converted network is unchanged
    gates = {n: p for n, p in gated.named_parameters() if n.endswith("shortcut_gate")}
    assert len(gates) == 19 and gates["layer1.0.bn1.shortcut_gate"].shape == (64,)
    (gated.train()(x) * torch.randn(2, 10)).sum().backward()  # (a plain sum has no gradient through train-mode BN)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values())
    with torch.no_grad():
        for p in gates.values():
            p.normal_()
        bn, conv = gated.layer1[0].bn1, gated.layer1[0].conv1
        gated.eval()
        seen = {}
        conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
        bn.register_forward_hook(lambda m, a, out: seen.__setitem__("bn", (a[0], out)))
        gated(x)
        a, out = seen["bn"]
        want = torch.nn.functional.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
        torch.testing.assert_close(out, want + bn.shortcut_gate.view(1, -1, 1, 1) * seen["in"])
    irconvert.save_packed(gated, tmp_path / "p.safetensors")
    again = irconvert.load_packed(tmp_path / "p.safetensors", model=timm.create_model("resnet18", num_classes=10))
    from irconvert.verify import max_abs_diff

    assert max_abs_diff(gated, again, x) == 0.0
