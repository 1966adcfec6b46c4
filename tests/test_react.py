"""ReActNet's RSign and RPReLU (methods/react.py) as policy options: forward and gradients against hand
computation, the recipe fields, and exact reload through state_dict, pack, load_packed and the runtime."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import irconvert
import irconvert.runtime as rt
from irconvert.errors import IRConvertError
from irconvert.layers import make_binary
from irconvert.methods import METHODS
from irconvert.methods.libra import _fused_mode
from irconvert.methods.react import RPReLU, with_rsign
from irconvert.models import create_model
from irconvert.ops import sign
from irconvert.pack import pack_layer
from irconvert.plan import Policy
from irconvert.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def rsign_layer(method: str = "vanilla") -> nn.Module:
    """A W1A1 conv with `method` and RSign, alpha set away from 0."""
    torch.manual_seed(0)
    layer = make_binary(nn.Conv2d(3, 4, 3, padding=1, bias=False), with_rsign(type(METHODS[method]))(), "W1A1")
    with torch.no_grad():
        layer.rsign_alpha.copy_(torch.tensor([0.5, -0.25, 0.0]))
    return layer


def test_rsign_forward_is_sign_of_x_minus_alpha_with_zero_positive():
    layer = rsign_layer()
    x = torch.tensor([[[[0.5, 0.4]], [[-0.25, -0.3]], [[0.0, -1e-9]]]])  # [1, 3, 1, 2]: x = alpha in column 0
    want = torch.tensor([[[[1.0, -1.0]], [[1.0, -1.0]], [[1.0, -1.0]]]])
    assert torch.equal(layer.binarizer.activation(x, layer), want)
    assert torch.equal(sign(x - layer.rsign_alpha.detach().view(1, 3, 1, 1)), want)


def test_rsign_gradient_reaches_alpha_by_hand():
    """Vanilla's clipped STE: dL/dalpha_c = -sum over channel c of 1{|x - alpha_c| <= 1} * dL/dB."""
    layer = rsign_layer("vanilla")
    x = torch.tensor([[[[1.4, 0.2, 3.0]], [[-2.0, 0.5, 0.7]], [[0.9, -0.9, 1.5]]]])
    g = torch.tensor([[[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]]])
    (layer.binarizer.activation(x, layer) * g).sum().backward()
    # x - alpha: [0.9, -0.3, 2.5], [-1.75, 0.75, 0.95], [0.9, -0.9, 1.5]; inside |.| <= 1: the first two, the last two, the first two
    assert torch.equal(layer.rsign_alpha.grad, torch.tensor([-3.0, -6.0, -3.0]))


def test_rsign_with_ede_gradient_by_hand():
    layer = rsign_layer("irnet")
    t = 0.5
    irconvert.set_ede(layer, t)
    k = max(1 / t, 1)
    x = torch.randn(2, 3, 4, 4)
    g = torch.randn(2, 3, 4, 4)
    (layer.binarizer.activation(x, layer) * g).sum().backward()
    v = x - layer.rsign_alpha.detach().view(1, 3, 1, 1)
    want = -(g * k * t * (1 - torch.tanh(t * v) ** 2)).sum((0, 2, 3))
    torch.testing.assert_close(layer.rsign_alpha.grad, want)


def test_rsign_composes_and_keeps_the_fused_weight_path():
    cls = Policy(rsign=True).binarizer()
    assert cls.name == "irnet+rsign" and type(cls) is type(Policy(method="irnet", rsign=True).binarizer())
    assert _fused_mode(type(cls)) == "ede"  # RSign changes the input only: Libra-PB's weight op still runs fused
    assert type(Policy().binarizer()) is type(METHODS["irnet"])
    w1a32 = make_binary(nn.Conv2d(3, 4, 3), cls, "W1A32")
    assert w1a32.binary_params == () and cls.threshold(w1a32) is None  # no input sign, no threshold


def test_rsign_packs_alpha_as_the_input_threshold_and_reloads_exactly():
    layer = rsign_layer("irnet")
    p = pack_layer(layer)
    assert torch.equal(p["threshold"], torch.tensor([0.5, -0.25, 0.0]))
    x = torch.randn(1, 3, 5, 5)
    x[:, :, 0] = layer.rsign_alpha.detach().view(1, 3, 1)  # a row exactly on the thresholds
    frozen = make_binary(nn.Conv2d(3, 4, 3, padding=1, bias=False), METHODS["irnet"], "W1A1")
    from irconvert.pack import binary_weight

    frozen.freeze(binary_weight(p["bits"], p["exp"], tuple(layer.latent_weight.shape)), p["threshold"])
    with torch.no_grad():
        assert torch.equal(frozen(x), layer(x))


def test_rprelu_forward_and_gradients_by_hand():
    act = RPReLU((2, 1, 1))
    assert torch.equal(act.beta.detach(), torch.full((2, 1, 1), 0.25))  # a converted model starts with slope 1/4
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([0.5, -1.0]).view(2, 1, 1))
        act.beta.copy_(torch.tensor([0.25, 2.0]).view(2, 1, 1))
        act.zeta.copy_(torch.tensor([1.0, -0.5]).view(2, 1, 1))
    x = torch.tensor([[[[1.5, 0.5, -0.5]], [[0.0, -1.0, -3.0]]]], requires_grad=True)  # [1, 2, 1, 3]
    y = act(x)
    # channel 0: x - 0.5 = 1, 0, -1 -> 1 + 1, 0.25 * 0 + 1, 0.25 * -1 + 1; channel 1: x + 1 = 1, 0, -2 -> 1 - 0.5, -0.5, -4.5
    assert torch.equal(y, torch.tensor([[[[2.0, 1.0, 0.75]], [[0.5, -0.5, -4.5]]]]))
    g = torch.tensor([[[[1.0, 2.0, 4.0]], [[1.0, 2.0, 4.0]]]])
    (y * g).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[[[1.0, 0.5, 1.0]], [[1.0, 4.0, 8.0]]]]))  # 1 above gamma, beta at and below
    assert torch.equal(act.gamma.grad.flatten(), torch.tensor([-(1 + 0.5 + 1.0), -(1 + 4.0 + 8.0)]))
    assert torch.equal(act.beta.grad.flatten(), torch.tensor([0 * 2 + -1 * 4.0, 0 * 2 + -2 * 4.0]))
    assert torch.equal(act.zeta.grad.flatten(), torch.tensor([7.0, 7.0]))


@pytest.mark.parametrize("item, message", [
    ("binarize.activation=prelu", "binarize.activation: Input should be 'hardtanh' or 'rprelu' (got 'prelu')"),
    ("binarize.rsign=maybe", "binarize.rsign: Input should be a valid boolean"),
    ("binarize.hardtanh=false", "activation rprelu replaces the ReLUs that hardtanh: false keeps"),
])
def test_bad_recipe_value_is_one_line_naming_the_field(item, message):
    with pytest.raises(IRConvertError) as err:
        load_recipe(RECIPES / "quickstart.yaml", ["binarize.activation=rprelu", item])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rsign_refuses_a_method_with_its_own_input_shift():
    with pytest.raises(IRConvertError) as err:
        load_recipe(RECIPES / "quickstart.yaml", ["binarize.method=sdbnn", "binarize.rsign=true"])
    assert "method sdbnn already learns an input threshold" in str(err.value) and "\n" not in str(err.value)
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["binarize.rsign=true", "binarize.activation=rprelu"])
    assert recipe.binarize.rsign and recipe.binarize.activation == "rprelu"


def randomize_react(model: nn.Module, seed: int = 1) -> nn.Module:
    """alpha, gamma, beta and zeta away from their initial values, as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RPReLU):
                m.gamma.copy_(torch.randn(m.gamma.shape, generator=g) * 0.3)
                m.beta.copy_(torch.rand(m.beta.shape, generator=g) * 1.5 - 0.25)
                m.zeta.copy_(torch.randn(m.zeta.shape, generator=g) * 0.3)
            alpha = getattr(m, "rsign_alpha", None)
            if alpha is not None:
                alpha.copy_(torch.randn(alpha.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("name", ["resnet18", pytest.param("torchvision:resnet50", marks=pytest.mark.slow)])
@torch.no_grad()
def test_converted_resnet_reloads_exactly_everywhere(name, tmp_path):
    torch.manual_seed(0)
    fp = create_model(name, num_classes=10)
    model = randomize_react(irconvert.binarize(fp, rsign=True, activation="rprelu")).eval()
    acts = {n: m for n, m in model.named_modules() if isinstance(m, RPReLU)}
    assert acts and not any(isinstance(m, nn.Hardtanh) for m in model.modules())
    if name == "resnet18":  # timm's blocks: one activation module per call, sized per channel
        assert tuple(acts["layer2.0.act1"].gamma.shape) == (128, 1, 1)
    else:  # torchvision's Bottleneck runs one ReLU on 64, 64 and 256 channels: one shared value
        assert tuple(acts["layer1.0.relu"].gamma.shape) == (1,)
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    irconvert.save_latent(model, tmp_path / "model.safetensors")
    irconvert.save_packed(model, tmp_path / "packed.safetensors")
    keys = load_file(tmp_path / "packed.safetensors").keys()
    assert not any(k.endswith("rsign_alpha") for k in keys) and any(k.endswith(".input.threshold") for k in keys)
    assert any(k.endswith(".zeta") for k in keys)  # RPReLU is a float module of the packed model
    copy = irconvert.binarize(fp, rsign=True, activation="rprelu")  # as resume does: the same FP weights, again
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.eval()(x), want)
    assert torch.equal(irconvert.load(tmp_path / "model.safetensors").eval()(x), want)
    assert torch.equal(irconvert.load_packed(tmp_path / "packed.safetensors")(x), want)
    fused = rt.load(tmp_path / "packed.safetensors")
    assert set(fused.irconvert_runtime.values()) == {"bitwise"}
    assert "RPReLU) does not fold" in " ".join(fused.irconvert_runtime.fusion.values())
    assert torch.equal(fused(x), want)
    assert torch.equal(rt.load(tmp_path / "packed.safetensors", fuse=False)(x), want)
    assert irconvert.summary(model, (3, 32, 32)).params == sum(p.numel() for p in model.parameters())


def test_linear_consumers_get_channels_last_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = torch.randn(4, 5, 8)  # [batch, tokens, 8]
    model = irconvert.binarize(net, activation="rprelu", features="binary", calibrate=batch, w1a1_min_fan_in=0)
    assert isinstance(model[1], RPReLU) and tuple(model[1].gamma.shape) == (16,)
    assert model(torch.randn(2, 5, 8)).shape == (2, 5, 4)


@pytest.mark.slow
def test_run_trains_them_and_resumes_to_the_same_weights(tmp_path, fashion_root, monkeypatch):
    from irconvert.run import run
    from irconvert.runfolder import RunFolder

    quick = ("data.subset=256", "data.val_subset=128", "data.batch_size=32", "train.epochs=2",
             "train.max_steps_per_epoch=3", "binarize.rsign=true", "binarize.activation=rprelu")
    args = dict(overrides=quick, log=lambda *a: None)
    full = tmp_path / "full"
    report = run("resnet18", RECIPES / "quickstart.yaml", out=full, **args)
    assert report["packed_max_abs_diff"] == 0.0
    latent = load_file(full / "model.safetensors")
    moved = [k for k, v in latent.items() if k.endswith(("rsign_alpha", ".gamma", ".zeta")) and v.abs().max() > 0]
    assert any(k.endswith("rsign_alpha") for k in moved) and any(k.endswith(".zeta") for k in moved)
    assert irconvert.verify.verify_file(full / "packed.safetensors")["max_abs_diff"] == 0.0

    real = RunFolder.write_metrics

    def crash_after_first_binary_epoch(folder):
        real(folder)
        if folder.stages[-1].name == "binary" and len(folder.stages[-1].history) == 1:
            raise KeyboardInterrupt

    part = tmp_path / "part"
    monkeypatch.setattr(RunFolder, "write_metrics", crash_after_first_binary_epoch)
    with pytest.raises(KeyboardInterrupt):
        run("resnet18", RECIPES / "quickstart.yaml", out=part, **args)
    monkeypatch.setattr(RunFolder, "write_metrics", real)
    run("resnet18", RECIPES / "quickstart.yaml", out=part, resume=True, **args)
    b = load_file(part / "model.safetensors")
    assert latent.keys() == b.keys() and all(torch.equal(latent[k], b[k]) for k in latent)


def _saved(fn):
    """Run fn() under saved-tensor hooks; return (its result, the tensors autograd kept)."""
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = fn()
    return out, kept


def _plain_rprelu(act, x):
    y = x - act.gamma
    return torch.where(y > 0, y, y * act.beta) + act.zeta


@pytest.mark.parametrize("negative_slope", [False, True])
def test_rprelu_keeps_its_output_and_gives_the_plain_formulas_numbers(negative_slope):
    """The output-keeping RPReLU (fused/rprelu.py): the same output bit for bit, the same input gradient bit
    for bit, the parameter gradients to float rounding; it keeps the output and a bool mask, not x - gamma.
    A slope <= 0 anywhere runs the plain formula."""
    torch.manual_seed(0)
    act = RPReLU((8, 1, 1))
    with torch.no_grad():
        act.gamma.normal_(0, 0.3), act.zeta.normal_(0, 0.3), act.beta.uniform_(0.05, 1.5)
        if negative_slope:
            act.beta[3] = -0.1
    x = torch.randn(4, 8, 6, 6) * 2
    x[0, :, 0, 0] = act.gamma.detach().flatten()  # exactly on the kink
    g = torch.randn(4, 8, 6, 6)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, kept = _saved(lambda: act(a))
    ref = _plain_rprelu(act, b)
    assert torch.equal(out, ref)
    floats = [t for t in kept if t.shape == x.shape and t.is_floating_point()]
    if negative_slope:
        assert any(t.data_ptr() != out.data_ptr() for t in floats)  # the plain formula keeps x - gamma
    else:
        assert [t.data_ptr() for t in floats] == [out.data_ptr()]
    grads = torch.autograd.grad(out, [a, act.gamma, act.beta, act.zeta], g)
    want = torch.autograd.grad(ref, [b, act.gamma, act.beta, act.zeta], g)
    assert torch.equal(grads[0], want[0])
    for got, exp in zip(grads[1:], want[1:]):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["irnet", "vanilla"])
def test_rsign_keeps_the_unshifted_input_and_gives_the_same_gradients(method):
    """RSign's sign keeps x (which the RPReLU in front keeps as its output) and shifts it again in the
    backward: the same signs, input gradient bit for bit, alpha's to rounding."""
    layer = rsign_layer(method)
    irconvert.set_ede(layer, 0.7)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    g = torch.randn(2, 3, 5, 5)
    signs, kept = _saved(lambda: layer.binarizer.activation(x, layer))
    assert [t.data_ptr() for t in kept if t.shape == x.shape] == [x.data_ptr()]
    gx, ga = torch.autograd.grad(signs, [x, layer.rsign_alpha], g)
    shifted = x - layer.rsign_alpha.view(1, 3, 1, 1)
    ref = layer.binarizer.input_sign(shifted, layer)  # the unfused composition: shift, then the method's sign
    assert torch.equal(signs, ref)
    wx, wa = torch.autograd.grad(ref, [x, layer.rsign_alpha], g)
    assert torch.equal(gx, wx)
    torch.testing.assert_close(ga, wa, rtol=1e-5, atol=1e-6)


def test_resnet_with_rsign_and_rprelu_trains_as_with_the_plain_ops(monkeypatch):
    """A converted ResNet-18 with RSign + RPReLU: outputs equal and gradients to rounding with the
    output-keeping ops switched off (the plain formulas), and fewer activation-sized tensors kept."""
    import irconvert.methods.react as react

    torch.manual_seed(0)
    fp = create_model("resnet18", num_classes=10)
    nets = [irconvert.binarize(fp, rsign=True, activation="rprelu", keep_projections=False) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(2, 3, 32, 32)
    results = []
    for i, net in enumerate(nets):
        if i == 1:
            monkeypatch.setattr(react, "rprelu_keeping_output", lambda *a: None)
            monkeypatch.setattr(react, "shifted_sign", lambda *a: None)
        net.train()
        out, kept = _saved(lambda: net(x))
        out.square().sum().backward()
        unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
        big = sum(v for v in unique.values() if v >= 2 * 16 * 8 * 8)
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}, big))
    assert torch.equal(results[0][0], results[1][0])
    for n, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][n], rtol=1e-4, atol=1e-5, msg=n)
    assert results[0][2] < 0.75 * results[1][2]
