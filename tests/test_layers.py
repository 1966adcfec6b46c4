"""Binary layers against hand computations of IR-Net's equations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
from irconvert.layers import make_binary
from irconvert.methods import METHODS


def hand_libra(w):
    """Libra-PB by hand: per row standardize (unbiased std), sign with sign(0)=+1, s=2^round(log2 mean|w_hat|)."""
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        row = w[i].double().flatten()
        mu = row.sum() / row.numel()
        var = ((row - mu) ** 2).sum() / (row.numel() - 1)
        w_hat = (row - mu) / math.sqrt(var)
        s = 2.0 ** round(math.log2(w_hat.abs().mean().item()))
        b = torch.where(w_hat >= 0, 1.0, -1.0)
        out[i] = (s * b).reshape(w[i].shape).to(w.dtype)
    return out


def hand_sign(x):
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


@pytest.mark.parametrize("mode", ["W1A1", "W1A32"])
def test_conv_forward_matches_hand_computation(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True)
    x = torch.randn(2, 5, 6, 6)
    x[0, :, 2, :] = 0.0  # exact zeros must binarize to +1
    make_binary(conv, METHODS["irnet"], mode)
    a = hand_sign(x) if mode == "W1A1" else x
    want = F.conv2d(a, hand_libra(conv.latent_weight.detach()), conv.bias, padding=1)
    got = conv(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_linear_forward_and_zero_input():
    torch.manual_seed(1)
    lin = nn.Linear(9, 4)
    make_binary(lin, METHODS["irnet"], "W1A1")
    x = torch.zeros(3, 9)
    want = F.linear(torch.ones(3, 9), hand_libra(lin.latent_weight.detach()), lin.bias)
    torch.testing.assert_close(lin(x), want, rtol=0, atol=1e-5)


def test_sign_of_zero_is_plus_one_and_values_are_one_bit():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30])
    assert irconvert.ops.sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0]


def test_scale_is_power_of_two_and_detached():
    torch.manual_seed(2)
    lin = nn.Linear(64, 8)
    make_binary(lin, METHODS["irnet"])
    w = lin.weight
    s = w.abs().amax(dim=1)
    assert torch.all(torch.log2(s) == torch.log2(s).round())
    # heavy tails move the exponent: a channel of mostly zeros with a few spikes has mean|w_hat| < 0.5
    w2 = torch.zeros(1, 64)
    w2[0, :2] = 10.0
    e = irconvert.methods.libra.scale_exponent(irconvert.methods.libra.balance(w2))
    w_hat = irconvert.methods.libra.balance(w2)
    assert e.item() == round(math.log2(w_hat.abs().mean().item())) and e.item() < 0


def test_constant_channel_gives_plus_one_scale_one_and_no_nan():
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight[1] = 0.25  # constant channel, std = 0
    make_binary(lin, METHODS["irnet"], "W1A32")
    w = lin.weight
    assert torch.equal(w[1], torch.ones(6))
    x = torch.randn(4, 6, requires_grad=True)
    lin(x).sum().backward()
    assert torch.isfinite(lin.latent_weight.grad).all() and torch.isfinite(x.grad).all()
    one = nn.Conv2d(1, 2, 1)  # fan-in of 1: unbiased std undefined, guarded the same way
    make_binary(one, METHODS["irnet"])
    assert torch.equal(one.weight.flatten(), torch.ones(2))


def reference_ede_forward(conv, x, t, k):
    """Same forward, but gradients from an independent surrogate whose derivative is EDE's."""
    def surrogate(v):
        smooth = k * torch.tanh(t * v)  # d/dv = k t (1 - tanh^2(t v))
        return hand_sign(v).detach() + smooth - smooth.detach()

    w = conv.latent_weight
    flat = w.flatten(1)
    w_hat = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).reshape(w.shape)
    s = torch.exp2(torch.log2(w_hat.detach().abs().flatten(1).mean(1)).round()).reshape(-1, 1, 1, 1)
    return F.conv2d(surrogate(x), surrogate(w_hat) * s, conv.bias, padding=1)


@pytest.mark.parametrize("t", [1e-3, 0.05, 1.0, 10.0])
def test_gradients_equal_analytic_ede(t):
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    make_binary(conv, METHODS["irnet"], "W1A1")
    irconvert.set_ede(conv, t)
    assert conv.ede_k == max(1 / t, 1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    g = torch.randn(2, 6, 5, 5)
    conv(x).backward(g)
    gx, gw = x.grad.clone(), conv.latent_weight.grad.clone()
    x.grad = None
    conv.latent_weight.grad = None
    reference_ede_forward(conv, x, t, max(1 / t, 1)).backward(g)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, conv.latent_weight.grad, rtol=1e-4, atol=1e-5)
    # at t = 1e-3, k t = 1 and tanh is flat: EDE is the identity near 0
    if t == 1e-3:
        assert torch.allclose(gx, F.conv_transpose2d(g, conv.weight.detach(), padding=1), atol=1e-4)


def test_vanilla_is_plain_sign_with_clipped_ste():
    lin = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -2.0, 0.0]]))
    make_binary(lin, METHODS["vanilla"], "W1A1")
    assert lin.weight.tolist() == [[1.0, -1.0, 1.0]]  # no balancing, no scale
    x = torch.tensor([[0.5, 3.0, -0.2]], requires_grad=True)
    lin(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0, 1.0]]  # grad of sign(x)*sign(w): sign(w) * 1{|x|<=1}
    assert lin.latent_weight.grad.tolist() == [[1.0, 0.0, -1.0]]  # sign(x) * 1{|w|<=1}


def test_ede_schedule_endpoints_and_midpoint():
    assert irconvert.ede_t(0) == pytest.approx(1e-3)
    assert irconvert.ede_t(1) == pytest.approx(10.0)
    assert irconvert.ede_t(0.5) == pytest.approx(10 ** ((-3 + 1) / 2))
    assert irconvert.ede_k(0.01) == pytest.approx(100.0) and irconvert.ede_k(5.0) == 1.0


def test_subclass_with_own_forward_keeps_its_behaviour():
    timm = pytest.importorskip("timm")
    torch.manual_seed(4)
    conv = timm.layers.StdConv2d(3, 4, 3, padding=1)
    make_binary(conv, METHODS["irnet"], "W1A1")
    assert isinstance(conv, timm.layers.StdConv2d) and type(conv).__name__ == "BinaryStdConv2d"
    x = torch.randn(1, 3, 5, 5)
    bw = hand_libra(conv.latent_weight.detach())
    # StdConv2d standardizes its (now binary) weight itself, with its own eps
    std_w = F.batch_norm(bw.reshape(1, 4, -1), None, None, training=True, momentum=0.0, eps=conv.eps).reshape_as(bw)
    want = F.conv2d(hand_sign(x), std_w, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-5)


def test_libra_balance_keeps_a_float64_weight_in_float64():
    w = torch.tensor([[1.0, 2.0, 4.0], [1e-9, 1e-9 + 1e-17, 1e-9]], dtype=torch.float64)
    got = irconvert.methods.libra.balance(w)
    mean = w.mean(dim=1, keepdim=True)
    want = (w - mean) / w.std(dim=1, keepdim=True)
    # in float32 the second row is constant (1e-9 + 1e-17 rounds to 1e-9) and would balance to 0
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6, atol=0) and got[1].abs().min() > 0.5
    assert irconvert.methods.libra.balance(w.half()).dtype == torch.float32
