"""SD-BNN and trained scaling factors: forward and gradients against hand computation, deployment
(threshold, float scale) and exact reload, and a real end-to-end conversion with each."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
from irconvert.ops import sign
from irconvert.layers import make_binary
from irconvert.methods import METHODS
from irconvert.models import create_model
from irconvert.pack import pack_layer
from irconvert.swap import method_penalty

NEW = ["sdbnn", "sdbnn_ede", "irnet_sd", "scaled", "irnet_scaled"]


def straight(x, grad_factor):
    """sign(x) forward with d/dx = grad_factor(x): an independent way to write a surrogate gradient."""
    return sign(x).detach() + (x - x.detach()) * grad_factor(x.detach())


def ste(x):
    return (x.abs() <= 1).float()


def approx(x):
    return (2 - 2 * x.abs()).clamp(min=0)


def conv_layer(method, mode="W1A1", gain=0, seed=0):
    torch.manual_seed(seed)
    layer = make_binary(nn.Conv2d(6, 5, 3, padding=1, bias=True), METHODS[method], mode, gain)
    with torch.no_grad():  # away from the initial values, so that every parameter matters
        for name in layer.binary_params:
            getattr(layer, name).add_(0.3 * torch.randn_like(getattr(layer, name)))
    return layer


@pytest.mark.parametrize("method", ["sdbnn", "sdbnn_ede"])
def test_sdbnn_forward_and_gradients_match_hand_computation(method):
    layer = conv_layer(method, gain=-2)
    t = 0.7
    irconvert.set_ede(layer, t)
    k = max(1 / t, 1)
    ede = lambda v: k * t * (1 - torch.tanh(t * v) ** 2)  # noqa: E731
    grad = ste if method == "sdbnn" else ede
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    g = torch.randn(2, 5, 5, 5)
    (layer(x) * g).sum().backward()

    w = layer.latent_weight.detach().clone().requires_grad_()
    dw = layer.weight_shift.detach().clone().requires_grad_()
    da = layer.input_shift.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bw = straight(w + dw.view(-1, 1, 1, 1), grad) * 0.25  # the gain 2^-2, no scale
    ba = straight(x2 + da.view(1, -1, 1, 1), grad)
    ref = F.conv2d(ba, bw, padding=1) + layer.bias.view(1, -1, 1, 1)  # the bias after the exact sum
    assert torch.equal(layer(x).detach(), ref.detach())
    (ref * g).sum().backward()
    for got, want in [(x.grad, x2.grad), (layer.weight_shift.grad, dw.grad), (layer.input_shift.grad, da.grad),
                      (layer._parameters["weight"].grad, w.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert layer.input_shift.grad.abs().sum() > 0 and layer.weight_shift.grad.abs().sum() > 0


def test_irnet_sd_shifts_the_balanced_weight_and_keeps_the_power_of_two_scale():
    layer = conv_layer("irnet_sd")
    w = layer.latent_weight.detach()
    flat = w.reshape(5, -1)
    w_hat = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).reshape(w.shape)
    s = 2.0 ** torch.log2(w_hat.abs().reshape(5, -1).mean(1)).round()
    want = sign(w_hat + layer.weight_shift.detach().view(-1, 1, 1, 1)) * s.view(-1, 1, 1, 1)
    assert torch.equal(layer.weight.detach(), want)


def test_scaled_forward_gradients_and_l2_match_hand_computation():
    layer = conv_layer("scaled", gain=-3)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    g = torch.randn(2, 5, 5, 5)
    out = layer(x)
    ((out * g).sum() + method_penalty(layer)).backward()

    w = layer.latent_weight.detach().clone().requires_grad_()
    alpha = layer.weight_scale.detach().clone().requires_grad_()
    beta = layer.input_scale.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bw = straight(w, ste) * (alpha.view(-1, 1, 1, 1) * 2.0**-3)
    ba = straight(x2, approx) * beta
    ref = F.conv2d(ba, bw, padding=1) + layer.bias.view(1, -1, 1, 1)  # the bias after the exact sum
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    ((ref * g).sum() + 0.5 * 1e-4 * alpha.square().sum()).backward()
    for got, want in [(x.grad, x2.grad), (layer.weight_scale.grad, alpha.grad), (layer.input_scale.grad, beta.grad),
                      (layer._parameters["weight"].grad, w.grad)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scaled_starts_from_xnor_scale_with_the_gain():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3)
    w = conv.weight.detach().clone()
    layer = make_binary(conv, METHODS["scaled"], "W1A1", gain=-3)
    mean_abs = w.reshape(3, -1).abs().mean(1)
    torch.testing.assert_close(layer.weight_scale.detach() * 2.0**-3, mean_abs)
    assert layer.input_scale.item() == 1.0
    w1a32 = make_binary(nn.Conv2d(4, 3, 3), METHODS["scaled"], "W1A32")
    assert w1a32.binary_params == ("weight_scale",)  # no activation scale where the input stays real


def test_new_parameters_are_trained_and_saved_under_their_names():
    for method, names in [("sdbnn", {"weight_shift", "input_shift"}), ("scaled", {"weight_scale", "input_scale"})]:
        layer = conv_layer(method)
        assert set(layer.binary_params) == names
        assert names <= set(layer.state_dict()) and names <= {n for n, _ in layer.named_parameters()}


@pytest.mark.parametrize("method", NEW)
def test_deploy_fields_carry_threshold_and_scale(method):
    layer = conv_layer(method, gain=-1).eval()
    p = pack_layer(layer)
    assert ("threshold" in p) == ("sd" in method)  # SD-BNN's input shift, tau = -d_a
    assert ("scale" in p) == ("scaled" in method) and ("exp" in p) != ("scale" in p)
    if "threshold" in p:
        assert torch.equal(p["threshold"], -layer.input_shift.detach())
    if "scale" in p:  # alpha * beta * 2^g, the float the forward pass multiplies the signs by
        assert torch.equal(p["scale"], ((layer.weight_scale * layer.input_scale).detach() * 0.5).abs())


def resnet_like(method, seed=0):
    torch.manual_seed(seed)
    model = irconvert.binarize(create_model("resnet18", num_classes=10, in_chans=1), method=method)
    with torch.no_grad():  # as training would leave them: shifted, scaled, BN statistics moved
        for name, p in model.named_parameters():
            p.add_((0.3 if name.endswith(("_shift", "_scale")) else 0.01) * torch.randn_like(p))
        model.train()(torch.randn(8, 1, 32, 32))
    return model.eval()


@pytest.mark.parametrize("method", NEW)
@pytest.mark.slow
def test_export_and_exact_reload(method, tmp_path):
    model = resnet_like(method)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        want = model(x)
    irconvert.save_latent(model, tmp_path / "model.safetensors")
    irconvert.save_packed(model, tmp_path / "packed.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "packed.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "irconvert-packed/2"
    assert not any(k.endswith(("_shift", "_scale")) for k in keys)  # folded, not stored twice
    assert any(k.endswith(".input.threshold") for k in keys) == ("sd" in method)
    assert any(k.endswith(".weight.scale") for k in keys) == ("scaled" in method)
    latent = irconvert.load(tmp_path / "model.safetensors").eval()
    packed = irconvert.load_packed(tmp_path / "packed.safetensors")
    with torch.no_grad():
        assert torch.equal(latent(x), want)
        assert torch.equal(packed(x), want)
    # a packed model re-packs to the same file contents
    irconvert.save_packed(packed, tmp_path / "again.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "packed.safetensors"), load_file(tmp_path / "again.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sdbnn", "scaled"])
@pytest.mark.slow
def test_bitwise_runtime_handles_threshold_and_float_scale(method, tmp_path):
    model = resnet_like(method, seed=1)
    irconvert.save_packed(model, tmp_path / "packed.safetensors")
    sim = irconvert.load_packed(tmp_path / "packed.safetensors")
    fast = irconvert.runtime.load(tmp_path / "packed.safetensors")
    assert list(fast.irconvert_runtime.values()).count("bitwise") >= 10
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ys, yf = sim(x), fast(x)
    if method == "sdbnn":  # power-of-two scales: every sum is exact
        assert torch.equal(ys, yf)
    else:  # a float scale times the integer dot, rounded once, against PyTorch's float sum
        torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-5)


def test_threshold_bits_follow_the_compare_exactly():
    """Inputs exactly at -d_a must give +1 in training, in the packed model and in the bitwise kernel."""
    torch.manual_seed(3)
    layer = make_binary(nn.Conv2d(40, 8, 3, padding=1, bias=False), METHODS["sdbnn"], "W1A1")
    with torch.no_grad():
        layer.input_shift.copy_(torch.randn(40))
    x = torch.randn(1, 40, 6, 6)
    x[:, :, :3] = -layer.input_shift.detach().view(1, -1, 1, 1)  # half the pixels sit on the threshold
    with torch.no_grad():
        want = layer(x)
    from irconvert.pack import binary_weight

    p = pack_layer(layer)
    frozen = make_binary(nn.Conv2d(40, 8, 3, padding=1, bias=False), METHODS["sdbnn"], "W1A1")
    frozen.freeze(binary_weight(p["bits"], p["exp"], tuple(layer.latent_weight.shape)), p["threshold"])
    twin = irconvert.runtime.BitwiseConv2d.from_binary(frozen, p["bits"], irconvert.runtime.scale_of(p["exp"]))
    with torch.no_grad():
        assert torch.equal(frozen(x), want) and torch.equal(twin(x), want)


def test_method_penalty_sums_l2_over_layers_and_is_none_without_it():
    model = resnet_like("scaled")
    alphas = [m.weight_scale for _, m in irconvert.binary_layers(model)]
    torch.testing.assert_close(method_penalty(model), sum(0.5 * 1e-4 * a.square().sum() for a in alphas))
    assert method_penalty(resnet_like("sdbnn")) is None


@pytest.mark.parametrize("method, moved", [("sdbnn", "input_shift"), ("scaled", "input_scale")])
@pytest.mark.slow
def test_end_to_end_conversion_trains_exports_and_reloads(method, moved, tmp_path, fashion_root):
    from pathlib import Path

    from irconvert.run import run

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"
    quick = ["data.subset=256", "data.val_subset=128", "data.batch_size=32", "teacher.finetune.epochs=1",
             "teacher.finetune.max_steps_per_epoch=2", "train.epochs=1", "train.max_steps_per_epoch=3",
             f"binarize.method={method}"] + (["binarize.rsign=false"] if method == "sdbnn" else [])  # ASD is its own shift
    out = tmp_path / method
    report = run("resnet18", recipe, out=out, overrides=tuple(quick), log=lambda *a: None)
    assert report["method"] == method and report["packed_max_abs_diff"] == 0.0
    latent = irconvert.load(out / "model.safetensors")
    start = 0.0 if method == "sdbnn" else 1.0  # d_a starts at 0, beta at 1: training moved them
    params = [p for n, p in latent.named_parameters() if n.endswith(moved)]
    assert params and any(float((p.detach() - start).abs().max()) > 0 for p in params)
    assert irconvert.verify.verify_file(out / "packed.safetensors")["max_abs_diff"] == 0.0
