"""Calibration (irconvert.calibrate): one-signed W1A1 inputs are found on a batch and fixed, by Hardtanh
where a ReLU reaches them through products and sums, else by W1A32 with a warning naming the layer."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
from irconvert.calibrate import input_stats


class SEBlock(nn.Module):
    """stem -> conv -> BN -> ReLU, times a sigmoid gate (from the stem) -> conv: the second conv sees ReLU(.) * gate >= 0."""

    def __init__(self, gate: str = "relu"):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.act = nn.ReLU() if gate == "relu" else nn.Sigmoid()
        self.fc = nn.Conv2d(16, 16, 1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        s = self.stem(x)
        x = self.act(self.bn1(self.conv1(s)))
        x = x * torch.sigmoid(self.fc(s.mean((2, 3), keepdim=True)))
        return self.head(self.bn2(self.conv2(x)).mean((2, 3)))


def _binarize(model, **kw):
    kw.setdefault("features", "binary")  # these models' last binary conv feeds the head through pooling only
    kw.setdefault("w1a1_min_fan_in", 0)  # 8-channel layers: W1A1 however narrow, what calibration looks at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = irconvert.binarize(model, **kw)
    return net, [str(w.message) for w in caught]


def _loss_drop(net, x, y, steps=20):
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    first = None
    for _ in range(steps):
        loss = F.cross_entropy(net(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 1 - float(F.cross_entropy(net(x), y)) / first


def test_relu_behind_a_gate_is_found_and_replaced_so_the_input_lives_and_the_model_learns():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = SEBlock()
    before, _ = _binarize(model, calibrate=False)
    # the static analysis does not follow the product: conv2's bits are all +1
    assert "act" not in before.irconvert_plan.hardtanh
    assert input_stats(before, x)["conv2"].share == 1.0
    assert input_stats(before, x)["conv1"].share == pytest.approx(0.5, abs=0.1)

    net, msgs = _binarize(model, calibrate=x)
    assert "act" in net.irconvert_plan.hardtanh and isinstance(net.act, nn.Hardtanh)
    assert net.conv2.binary_mode == "W1A1"
    assert 0.2 < net.irconvert_plan.live["conv2"] < 0.8
    assert not any("conv2" in m for m in msgs)
    assert _loss_drop(net, x, y) >= 0.10


def test_input_that_no_hardtanh_can_fix_becomes_w1a32_with_a_warning_naming_it(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    net, msgs = _binarize(SEBlock(gate="sigmoid"), calibrate=x)
    assert net.conv2.binary_mode == "W1A32" and net.irconvert_plan.layers["conv2"].mode == "W1A32"
    assert net.conv1.binary_mode == "W1A1"
    assert any(m.startswith("conv2: W1A32, as 100.0% of its input bits were +1") and "sigmoid" in m for m in msgs)
    loaded = irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"), model=SEBlock("sigmoid"))
    assert loaded.conv2.binary_mode == "W1A32"
    assert irconvert.verify.max_abs_diff(net, loaded, x) == 0


@pytest.mark.parametrize("fields, only_w1a1", [({"rsign": True}, "rsign_alpha"), ({"method": "sdbnn"}, "input_shift")])
def test_a_layer_made_w1a32_loses_the_parameters_only_w1a1_has_and_its_latent_file_reloads(tmp_path, fields, only_w1a1):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    net, _ = _binarize(SEBlock(gate="sigmoid"), calibrate=x, **fields)
    assert net.conv2.binary_mode == "W1A32" and net.conv1.binary_mode == "W1A1"
    assert hasattr(net.conv1, only_w1a1) and not hasattr(net.conv2, only_w1a1)
    assert only_w1a1 not in net.conv2.binary_params
    assert not any(k.startswith(f"conv2.{only_w1a1}") for k in net.state_dict())
    # the rebuild makes conv2 W1A32 from the start: the state_dicts match key for key
    loaded = irconvert.load(irconvert.save_latent(net, tmp_path / "m.safetensors"), model=SEBlock("sigmoid"))
    assert loaded.state_dict().keys() == net.state_dict().keys()
    assert irconvert.verify.max_abs_diff(net, loaded, x) == 0


def test_pooled_input_whose_bits_are_the_same_for_every_sample_becomes_w1a32():
    torch.manual_seed(0)
    # the pooled features share their signs across samples (a channel's constant offset dominates)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))
    model[1].bias.data = torch.tensor([2.0, -2.0] * 4)
    x = torch.randn(4, 3, 8, 8)
    st = input_stats(irconvert.binarize(model, calibrate=False, features="binary", w1a1_min_fan_in=0), x)["3"]
    assert st.varying == 0.0 and 0 < st.share < 1
    net, msgs = _binarize(model, calibrate=x)
    assert net[3].binary_mode == "W1A32"
    assert any(m.startswith("3: W1A32") and "same for every sample" in m for m in msgs)


def test_calibration_leaves_batchnorm_statistics_and_the_random_stream_as_they_were():
    torch.manual_seed(0)
    model = SEBlock()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    net, _ = _binarize(model, calibrate=torch.randn(8, 3, 16, 16))
    after = torch.rand(1)
    torch.manual_seed(1)
    torch.randn(8, 3, 16, 16)
    assert torch.equal(after, torch.rand(1))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_wide_input_gets_its_gradient_divided_by_its_std_and_the_latent_file_keeps_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 2))
    x = torch.randn(4, 3, 10, 10) * 50  # the middle conv's input: std ~ 30 x the unit scale
    net, _ = _binarize(model, calibrate=x)
    std = float(net[0](x).detach().std())
    assert net[1].input_grad_scale == pytest.approx(1 / std, rel=1e-4) and std > 1
    a = x.clone().requires_grad_()
    (g_scaled,) = torch.autograd.grad(net[1](net[0](a)).sum(), a)
    net[1].input_grad_scale = 1.0
    (g_plain,) = torch.autograd.grad(net[1](net[0](a)).sum(), a)
    torch.testing.assert_close(g_scaled, g_plain / std, rtol=1e-4, atol=1e-6)
    net[1].input_grad_scale = 1 / std
    loaded = irconvert.load(irconvert.save_latent(net, tmp_path / "m.safetensors"), model=model.__class__(*[
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(128, 2)]))
    assert loaded[1].input_grad_scale == pytest.approx(1 / std, rel=1e-6)


def test_summary_shows_the_share_of_each_w1a1_input():
    torch.manual_seed(0)
    net, _ = _binarize(SEBlock(), calibrate=torch.randn(8, 3, 16, 16))
    s = irconvert.summary(net, (3, 16, 16))
    row = next(r for r in s.rows if r.name == "conv2")
    assert row.plus_share == net.irconvert_plan.live["conv2"]
    assert next(r for r in s.rows if r.name == "stem").plus_share is None
    assert f"{100 * row.plus_share:5.1f}%" in str(s)


@pytest.mark.slow
def test_skresnet18_had_one_signed_inputs_and_now_learns():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("skresnet18", num_classes=10)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    # keep_gates off: SK's attention layers binary, the ones fed behind its softmax-weighted sum
    before, _ = _binarize(model, calibrate=False, keep_gates=False)
    shares = input_stats(before, x)
    assert max(shares.values(), key=lambda s: s.share).share == 1.0  # behind SK's softmax-weighted sum
    net, _ = _binarize(model, calibrate=x, keep_gates=False)
    assert all(1e-3 < s < 1 - 1e-3 for s in net.irconvert_plan.live.values())
    assert _loss_drop(net, x, y) >= 0.10
