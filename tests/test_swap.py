"""The swap: binary layers in place with a compatible state_dict, EDE's t on every layer, Bi-Real shortcuts."""

import pytest
import timm
import torch

import irconvert
from irconvert.layers import BinaryMixin


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


@pytest.mark.slow
def test_converted_model_trains_and_set_ede_reaches_all_layers():
    b = irconvert.binarize(timm.create_model("resnet18", num_classes=10))
    irconvert.set_ede(b, 0.5)
    layers = list(irconvert.binary_layers(b))
    assert len(layers) == 19 and all(m.ede_t == 0.5 and m.ede_k == 2.0 for _, m in layers)
    out = b(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    assert all(m.latent_weight.grad is not None for _, m in layers)


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
