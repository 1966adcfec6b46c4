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
    b = irconvert.binarize(timm.create_model("resnet18", num_classes=10), keep_projections=False)
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
    plain = irconvert.binarize(model, shortcut=False, keep_projections=False).eval()
    short = irconvert.binarize(model, shortcut=True, keep_projections=False).eval()
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
    plain = irconvert.binarize(model, shortcut=False, keep_projections=False).eval()
    gated = irconvert.binarize(model, shortcut="gated", keep_projections=False).eval()
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


class Residual(torch.nn.Module):
    """stem -> ReLU -> W1A1 conv -> ReLU -> W1A1 conv, plus the stem's ReLU output (a residual: not binary)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.drop = nn.Identity()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.act0(self.bn0(self.stem(x)))
        y = self.conv2(self.drop(self.act1(self.bn1(self.conv1(a)))))
        return self.head(self.act2(self.bn2(y) + a).mean((2, 3)))


def unfused(model):
    """A copy with nn.Hardtanh back where the pass fused or replaced one, and no layer's sign clipping."""
    import copy

    from irconvert.fused.hardtanh import HardtanhKeepingOutput

    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if name in ref.irconvert_plan.fused or isinstance(m, HardtanhKeepingOutput):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, torch.nn.Hardtanh(-1.0, 1.0))
        if isinstance(m, BinaryMixin):
            m.binary.clip = False
    return ref


def step(model, x, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = model.train()(x)
    out.float().square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_hardtanh_read_only_by_binary_layers_is_fused_into_the_sign(amp, monkeypatch):
    from contextlib import nullcontext

    from irconvert.fused.hardtanh import HardtanhKeepingOutput

    model = irconvert.binarize(Residual(), keep_first=True)
    assert model.irconvert_plan.hardtanh == ("act0", "act1")
    # act1 feeds conv2 only (through an Identity): fused; act0 also feeds the residual sum: kept
    assert model.irconvert_plan.fused == ("act1",)
    assert isinstance(model.act1, torch.nn.Identity) and model.conv2.binary.clip and not model.conv1.binary.clip
    assert type(model.act0) is HardtanhKeepingOutput
    irconvert.set_ede(model, 0.2)
    x = torch.randn(4, 3, 6, 6)
    out, grads = step(model, x, amp)
    monkeypatch.setattr("irconvert.layers.kept_small", lambda *a, **k: nullcontext())  # floats kept, as before
    out_ref, grads_ref = step(unfused(model), x, amp)
    assert torch.equal(out, out_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_no_fusion_where_the_sign_is_not_plain_or_the_file_is_reloaded(tmp_path):
    model = irconvert.binarize(Residual(), method="sdbnn")  # sign(hardtanh(x) + d_a) is not sign(x + d_a)
    assert model.irconvert_plan.fused == () and isinstance(model.act1, torch.nn.Hardtanh)
    model = irconvert.binarize(Residual())
    step(model, torch.randn(4, 3, 6, 6), False)
    # files record the Hardtanh, not the fusion: the deployment model has it back, the trainable one
    # (load) is fused again as binarize fused it; both compute the same
    packed = irconvert.load_packed(irconvert.save_packed(model, tmp_path / "packed.safetensors"), model=Residual())
    latent = irconvert.load(irconvert.save_latent(model, tmp_path / "model.safetensors"), model=Residual())
    assert isinstance(packed.act1, torch.nn.Hardtanh)
    assert latent.irconvert_plan.fused == model.irconvert_plan.fused and type(latent.act1) is type(model.act1)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        want = model.eval()(x)
        assert torch.equal(packed(x), want) and torch.equal(latent.eval()(x), want)


class Shared(Residual):
    """conv1 runs twice: on a BatchNorm's output and on act0's, so its sign cannot take act0's mask."""

    def forward(self, x):
        y = self.conv1(self.bn0(self.stem(x)))
        return self.head(self.conv1(self.act0(self.bn1(y))).mean((2, 3)))


def test_no_fusion_into_a_layer_that_also_runs_elsewhere():
    model = irconvert.binarize(Shared(), features="binary")  # conv1 also feeds the head: W1A1 all the same
    assert model.irconvert_plan.hardtanh == ("act0",) and model.conv1.binary_mode == "W1A1"
    assert model.irconvert_plan.fused == () and not model.conv1.binary.clip


def test_fused_model_has_no_graph_break():
    model = irconvert.binarize(Residual())
    assert model.irconvert_plan.fused == ("act1",)
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 3, 6, 6)).sum().backward()
    assert counts["n"] == 1
