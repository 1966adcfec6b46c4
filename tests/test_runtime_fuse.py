"""The fused runtime (irconvert.runtime.fuse): BatchNorm, residual sums and activations folded into the
bitwise convs, packed bits passed between them; outputs equal load_packed's bit for bit where the
fold is exact, with the compiled kernel and with its PyTorch fallback."""

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

import irconvert
import irconvert.runtime as rt
from irconvert.layers import make_binary
from irconvert.methods import METHODS
from irconvert.models import create_model
from irconvert.pack import binary_weight, fan_in_order, pack_signs
from irconvert.runtime import fuse, kernels

from helpers import run_all




def assert_bit_identical(sim, net, x, monkeypatch, backends) -> None:
    """The runtime model `net` gives exactly the float simulation's output on x, with every backend."""
    want = sim(x)
    for y in run_all(monkeypatch, backends, lambda: net(x)).values():
        assert torch.equal(y, want)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics far from the identity, a quarter of the gammas negative and some zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            gamma = torch.randn(c, generator=g) * 0.3 + 1.0
            gamma[torch.rand(c, generator=g) < 0.25] *= -1
            gamma[torch.rand(c, generator=g) < 0.05] = 0.0
            m.weight.data.copy_(gamma)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model


def packed_pair(model, tmp_path, architecture=None):
    """(load_packed's model, the runtime's) of `model`; `architecture` makes the unconverted model of a user class."""
    path = irconvert.save_packed(model, tmp_path / "packed.safetensors")
    make = architecture or (lambda: None)
    return irconvert.load_packed(path, make()), rt.load(path, make())


def _round32(q: Fraction) -> float:
    """q rounded to the nearest float32 (ties to even), normal range."""
    if q == 0:
        return 0.0
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    e = e if Fraction(2) ** e <= q else e - 1
    m = q / Fraction(2) ** (e - 23)
    n, r = divmod(m.numerator, m.denominator)
    if 2 * r > m.denominator or (2 * r == m.denominator and n % 2):
        n += 1
    return sign * math.ldexp(n, e - 23)


def test_fma32_rounds_once():
    torch.manual_seed(0)
    a = torch.randint(-4096, 4097, (3000,)).float()
    b = torch.randn(3000) * 2.0 ** torch.randint(-8, 8, (3000,)).float()
    c = torch.randn(3000) * 2.0 ** torch.randint(-30, 10, (3000,)).float()  # sums far from both magnitudes
    got = kernels.fma32(a, b, c)
    want = [_round32(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert got.tolist() == want


def _conv_bn(gamma: float, beta: float, mean: float) -> tuple[rt.BitwiseConv2d, nn.BatchNorm2d]:
    """A 1x1 conv of 4 channels (dot in [-4, 4], s = 1) and a BatchNorm y -> gamma * (y - mean) + beta."""
    conv = rt.BitwiseConv2d(torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.ones(1), None, 4)
    bn = nn.BatchNorm2d(1, eps=0.0).eval()
    bn.running_mean.fill_(mean), bn.running_var.fill_(1.0), bn.weight.data.fill_(gamma), bn.bias.data.fill_(beta)
    return conv, bn


@pytest.mark.parametrize("gamma, beta, mean, thr, direction", [
    (1.0, 0.0, 2.5, 3, 1),           # y - 2.5 < 0  <=>  dot < 3
    (-1.0, 0.0, 2.5, 2, -1),         # -(y - 2.5) < 0  <=>  dot > 2
    (1.0, 0.0, 3.0, 3, 1),           # the tie: BN(3) = 0 and sign(0) = +1, so dot = 3 is +1
    (0.0, -1.0, 0.0, 2**31 - 1, 1),  # gamma 0: BN = -1 everywhere, every dot < INT_MAX
    (0.0, 0.0, 0.0, -(2**31), 1),    # gamma 0, beta 0: BN = 0, sign +1, no dot < INT_MIN
    (1.0, 0.0, -7.0, -(2**31), 1),   # all of [-4, 4] is above the mean
])
def test_thresholds_by_hand(gamma, beta, mean, thr, direction):
    conv, bn = _conv_bn(gamma, beta, mean)
    t, d = fuse.thresholds(conv, [("bn", bn), ("clamp", nn.Hardtanh())], None)
    assert (int(t), int(d)) == (thr, direction)


def test_threshold_includes_the_consumers_input_threshold():
    conv, bn = _conv_bn(1.0, 0.0, 0.0)  # y = dot, clamped to [-1, 1]; the next layer binarizes y - 0.5
    t, d = fuse.thresholds(conv, [("bn", bn), ("clamp", nn.Hardtanh())], torch.tensor([0.5]))
    assert (int(t), int(d)) == (1, 1)  # dot = 0 -> -0.5 (-1), dot = 1 -> 0.5 (+1)


def test_bn_affine_reads_torchs_own_alpha_and_beta():
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(33)).eval())[0]
    alpha, beta = fuse.bn_affine(bn)
    x = torch.randn(2, 33, 5, 7) * 10
    assert torch.equal(bn(x), kernels.fma32(x, alpha.reshape(1, -1, 1, 1), beta.reshape(1, -1, 1, 1)))


@pytest.mark.parametrize("name, method", [("resnet18", "irnet"),
                                          pytest.param("torchvision:resnet18", "irnet", marks=pytest.mark.slow),
                                          pytest.param("resnet18", "sdbnn", marks=pytest.mark.slow)])
@torch.no_grad()
def test_resnet_is_bit_identical_to_load_packed(name, method, backends, monkeypatch, tmp_path):
    torch.manual_seed(0)
    # no shortcut (auto puts one on each binary downsample conv): every BatchNorm of the blocks folds; binary
    # downsamples (keep_projections off), so all 19 convs after the stem run bitwise
    model = irconvert.binarize(randomize_bn(create_model(name, num_classes=10)), method=method, shortcut=False,
                               keep_projections=False)
    sim, net = packed_pair(model, tmp_path)
    assert isinstance(net, torch.fx.GraphModule) and set(net.irconvert_runtime.values()) == {"bitwise"}
    fusion = net.irconvert_runtime.fusion
    assert len(fusion) == len(net.irconvert_runtime) == 19
    # inside each block conv1 -> BN -> Hardtanh -> conv2 is chained in bits by integer thresholds
    assert all(v.startswith("fused: BatchNorm2d Hardtanh -> bits (integer thresholds)")
               for k, v in fusion.items() if k.endswith("conv1"))
    assert all("input bits" in v for k, v in fusion.items() if k.endswith("conv2"))
    # across blocks the sum stays real-valued; the conv writes it and its signs (SD-BNN's next layers
    # binarize x - tau: they take the float and pack it themselves)
    assert "+ layer2.0.downsample" in fusion["layer2.0.conv2"]
    assert ("float + bits" if method == "irnet" else "-> float;") in fusion["layer2.0.conv2"]
    assert not any(isinstance(m, nn.BatchNorm2d) for n, m in net.named_modules() if n.startswith("layer"))
    x = torch.randn(2, 3, 32, 32)
    assert_bit_identical(sim, net, x, monkeypatch, backends)


@pytest.mark.slow
@torch.no_grad()
def test_resnet34_at_224_is_bit_identical(backends, monkeypatch, tmp_path):
    torch.manual_seed(1)
    sim, net = packed_pair(irconvert.binarize(randomize_bn(create_model("resnet34"), 1)), tmp_path)
    x = torch.randn(1, 3, 224, 224)
    assert_bit_identical(sim, net, x, monkeypatch, backends[:1])


@pytest.mark.parametrize("shortcut, width", [(False, False), ("auto", False), ("auto", True)])
@torch.no_grad()
def test_mobilenet_keeps_depthwise_float_and_is_bit_identical(shortcut, width, backends, monkeypatch, tmp_path):
    torch.manual_seed(2)
    model = irconvert.binarize(randomize_bn(create_model("mobilenetv2_100", num_classes=10), 2), shortcut=shortcut,
                               shortcut_width=width, w1a1_min_fan_in=0)  # blocks.1's 16-channel convs W1A1 too
    if shortcut:  # plain shortcuts on the blocks without a residual sum
        assert ("blocks.1.0.conv_pw", "blocks.1.0.bn1") in model.irconvert_plan.shortcuts
    sim, net = packed_pair(model, tmp_path)
    fusion = net.irconvert_runtime.fusion
    assert type(net.get_submodule("blocks.1.0.conv_dw")) is nn.Conv2d and "conv_dw" not in str(list(fusion))
    assert isinstance(net, torch.fx.GraphModule)  # a shortcut's BatchNorm is one node of the graph
    unfused = "not fused: the Bi-Real shortcut reads its float input"
    if shortcut:  # the shortcut reads the conv's float input, and its BatchNorm adds S(x): neither folds
        assert fusion["blocks.1.0.conv_pw"] == unfused and fusion["blocks.1.0.conv_pwl"] == unfused
        assert "ShortcutBatchNormAct2d" in type(net.get_submodule("blocks.1.0.bn1")).__name__
    if shortcut and width:  # every expand and project conv changes the width: each has its shortcut
        assert fusion["blocks.1.1.conv_pw"] == unfused and fusion["blocks.1.1.conv_pwl"] == unfused
    else:
        assert fusion["blocks.1.1.conv_pw"].startswith("fused: BatchNorm2d ReLU6 -> float")
        # the next block's residual sum folds into its conv_pwl; it adds the unfused shortcut BatchNorm's output
        assert ("+ blocks.1.0.bn3" if shortcut else "+ blocks.1.0.conv_pwl") in fusion["blocks.1.1.conv_pwl"]
    x = torch.randn(2, 3, 48, 48)
    assert_bit_identical(sim, net, x, monkeypatch, backends)


@pytest.mark.slow
@torch.no_grad()
def test_vit_runs_its_linears_bitwise_and_says_they_are_not_fused(backends, monkeypatch, tmp_path):
    torch.manual_seed(3)
    model = irconvert.binarize(create_model("vit_tiny_patch16_224", num_classes=10, img_size=32))
    sim, net = packed_pair(model, tmp_path)
    fusion = net.irconvert_runtime.fusion
    assert set(fusion) == {k for k, v in net.irconvert_runtime.items() if v == "bitwise"} and fusion
    assert all(v.startswith("not fused: Linear") for v in fusion.values())
    x = torch.randn(2, 3, 32, 32)
    assert_bit_identical(sim, net, x, monkeypatch, backends)  # the ViT's binary Linears have biases: within the runtime's ulps, here exact


class TwoConvs(nn.Module):
    """A binary conv whose output two binary convs read (packed once) and one with a trained float scale."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 70, 3, padding=1)
        self.a = nn.Conv2d(70, 70, 3, padding=1, bias=False)
        self.b = nn.Conv2d(70, 70, 3, padding=1, bias=False)
        self.c = nn.Conv2d(70, 70, 1, bias=False)
        self.bn = nn.BatchNorm2d(70)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        x = self.pool(self.stem(x))
        return self.bn(self.b(x)) + self.c(x) + self.a(x)


@torch.no_grad()
def test_shared_input_is_packed_once_and_pools_keep_their_values(backends, monkeypatch, tmp_path):
    torch.manual_seed(4)
    model = irconvert.binarize(randomize_bn(TwoConvs().eval()), keep_last=False, shortcut=False)
    sim, net = packed_pair(model, tmp_path, TwoConvs)
    assert sum(isinstance(m, rt.PackSigns) for m in net.modules()) == 1
    fusion = net.irconvert_runtime.fusion
    assert all("input bits (pool_signs)" in fusion[k] for k in ("a", "b", "c")), fusion
    assert fusion["b"].startswith("fused: BatchNorm2d + c -> float")  # c's output is b's residual
    x = torch.randn(2, 3, 21, 19)
    assert_bit_identical(sim, net, x, monkeypatch, backends)


@torch.no_grad()
def test_unfused_load_is_the_plain_module(tmp_path):
    torch.manual_seed(5)
    model = irconvert.binarize(randomize_bn(TwoConvs().eval()), keep_last=False, shortcut=False)
    sim, _ = packed_pair(model, tmp_path, TwoConvs)
    net = rt.load(tmp_path / "packed.safetensors", TwoConvs(), fuse=False)
    assert type(net) is TwoConvs and not net.irconvert_runtime.fusion
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(net(x), sim(x))


@torch.no_grad()
def test_fused_conv_with_broadcast_residual_adds_it_after(backends, monkeypatch):
    torch.manual_seed(6)
    layer = make_binary(nn.Conv2d(20, 8, 3, padding=1, bias=False), METHODS["irnet"], "W1A1")
    shape = tuple(layer.latent_weight.shape)
    signs = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    exp = torch.randint(-3, 1, (8,), dtype=torch.int8)
    bits = pack_signs(fan_in_order(signs))
    layer.freeze(binary_weight(bits, exp, shape))
    twin = rt.BitwiseConv2d.from_binary(layer.eval(), bits, rt.scale_of(exp))
    fused = rt.FusedConv2d(twin, twin.scale, torch.randn(8), True, (-1.0, 1.0), want_bits=True)
    x, r = torch.randn(2, 20, 5, 5), torch.randn(1, 8, 1, 5)
    want = torch.clamp(layer(x) + fused.beta.reshape(1, -1, 1, 1) + r, -1, 1)  # s * dot exact, one rounding each
    for y, b in run_all(monkeypatch, backends, lambda: fused(x, r)).values():
        assert torch.equal(y, want) and torch.equal(b, kernels.pack(want))


@torch.no_grad()
def test_a_failed_plan_runs_the_model_unfused(monkeypatch, tmp_path):
    torch.manual_seed(7)
    model = irconvert.binarize(randomize_bn(TwoConvs().eval()), keep_last=False, shortcut=False)
    sim, _ = packed_pair(model, tmp_path, TwoConvs)

    def broken(*args):
        raise KeyError("no such node")

    monkeypatch.setattr(fuse, "_fuse_one", broken)
    with pytest.warns(RuntimeWarning, match="fusion failed .*KeyError.*running unfused"):
        net = rt.load(tmp_path / "packed.safetensors", TwoConvs())
    assert type(net) is TwoConvs and set(net.irconvert_runtime.fusion.values()) == {"not fused: planning failed (KeyError)"}
    x = torch.randn(1, 3, 12, 12)
    assert torch.equal(net(x), sim(x))


class MaskedHead(nn.Module):
    """Two binary convs and a head run only for the default argument, as timm's Hiera."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, mask=None):
        x = nn.functional.hardtanh(self.bn0(self.stem(x)))
        x = self.bn2(self.b(nn.functional.hardtanh(self.bn1(self.a(x))))) + x
        if mask is None:
            x = self.fc(x.mean((2, 3)))
        return x


@torch.no_grad()
def test_a_head_behind_a_default_argument_stays_in_the_fused_model(backends, monkeypatch, tmp_path):
    # fx makes `mask` a proxy, never None: the fused graph lost the head and returned the features
    torch.manual_seed(6)
    model = irconvert.binarize(randomize_bn(MaskedHead().eval()), shortcut=False, w1a1_min_fan_in=0)
    sim, net = packed_pair(model, tmp_path, MaskedHead)
    assert isinstance(net, torch.fx.GraphModule)
    assert net.irconvert_runtime.fusion["b"].startswith("fused"), net.irconvert_runtime.fusion
    x = torch.randn(2, 3, 10, 10)
    assert sim(x).shape == (2, 3)
    assert_bit_identical(sim, net, x, monkeypatch, backends)
