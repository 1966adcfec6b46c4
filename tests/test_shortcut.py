"""The Bi-Real shortcut S(x) for every shape of 2-D conv, exact through the packed file and the bitwise
runtime; and where `shortcut: auto` puts it (the graph's real-valued paths)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
import irconvert.runtime as rt
from irconvert.plan import SHORTCUT_ADDED, SHORTCUT_AROUND, Policy
from irconvert.shortcut import bireal_shortcut
from irconvert.verify import max_abs_diff


def test_shrinking_averages_the_channels_congruent_modulo_the_output_channels():
    x = torch.arange(7.0).reshape(1, 7, 1, 1) * torch.ones(1, 7, 2, 3)
    y = bireal_shortcut(x, (1, 1), 3, (2, 3))
    # o = 0: channels 0, 3, 6; o = 1: 1, 4; o = 2: 2, 5 (groups of ceil / floor of 7 / 3)
    assert y.shape == (1, 3, 2, 3) and y[0, :, 0, 0].tolist() == [3.0, 2.5, 3.5]
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(bireal_shortcut(x, (1, 1), 3, (4, 4)), (x[:, :3] + x[:, 3:]) / 2, rtol=0, atol=0)


def test_widening_tiles_the_input_channels_for_any_ratio():
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(bireal_shortcut(x, (1, 1), 8, (3, 3)), torch.cat([x, x], 1))
    assert torch.equal(bireal_shortcut(x, (1, 1), 6, (3, 3)), x[:, [0, 1, 2, 3, 0, 1]])


def test_stride_pools_then_crops_or_pads_to_the_conv_output_centred():
    x = torch.arange(49.0).reshape(1, 1, 7, 7)
    pooled = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)  # 4 x 4, the last row of 1 x 2 windows
    assert pooled[0, 0, 3, 3] == 48.0
    assert torch.equal(bireal_shortcut(x, (2, 2), 1, (4, 4)), pooled)  # k3 p1 s2: ceil(7 / 2)
    assert torch.equal(bireal_shortcut(x, (2, 2), 1, (3, 3)), pooled[..., :3, :3])  # k3 p0 s2: one cut at the end
    assert torch.equal(bireal_shortcut(x, (1, 1), 1, (5, 5)), x[..., 1:6, 1:6])  # k3 p0 s1: one cut at each side
    grown = bireal_shortcut(x, (1, 1), 1, (10, 9))  # padding beyond the size: zeros, the odd one at the end
    assert torch.equal(grown[..., 1:8, 1:8], x) and grown.sum() == x.sum() and grown[0, 0, 0].abs().sum() == 0
    assert grown[0, 0, 8:].abs().sum() == 0 and grown[0, 0, :, 8].abs().sum() == 0


def _old_shortcut(x, conv):
    """S(x) as irconvert wrote it before every shape was allowed (integer widening, size-keeping padding)."""
    s = conv.stride[0]
    if s > 1:
        x = F.avg_pool2d(x, s, s, ceil_mode=True, count_include_pad=False)
    return x.repeat(1, conv.out_channels // conv.in_channels, 1, 1)


@pytest.mark.parametrize("k, s, h", [(1, 1, 8), (3, 1, 7), (3, 2, 7), (3, 2, 8), (1, 2, 9), (5, 3, 11)])
def test_the_shapes_older_files_hold_are_computed_as_before(k, s, h):
    conv = nn.Conv2d(4, 8, k, s, padding=k // 2)
    x = torch.randn(2, 4, h, h)
    out = conv(x)
    assert torch.equal(bireal_shortcut(x, conv.stride, 8, tuple(out.shape[-2:])), _old_shortcut(x, conv))


@pytest.mark.parametrize("k, s, p, d", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 0, 1), (3, 2, 1, 1), (2, 2, 0, 1),
                                        (4, 2, 1, 1), (3, 1, 0, 1), (1, 1, 2, 1), (3, 1, 1, 2), (5, 3, 1, 1)])
@pytest.mark.parametrize("h", [1, 6, 7])
def test_the_shortcut_has_the_conv_output_shape_for_every_geometry(k, s, p, d, h):
    conv = nn.Conv2d(5, 3, k, s, p, d)
    x = torch.randn(1, 5, h, h + 1)
    try:
        out = conv(x)
    except RuntimeError:  # the kernel does not fit this input at all
        return
    assert bireal_shortcut(x, conv.stride, 3, tuple(out.shape[-2:])).shape == out.shape


class Chain(nn.Module):
    """stem (full precision) -> the conv under test -> a second conv -> head: nothing goes around `conv`."""

    def __init__(self, cin, cout, k, s, p, d=1):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU()
        self.conv, self.bn1, self.act1 = nn.Conv2d(cin, cout, k, s, p, d, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(cout, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = self.act1(self.bn1(self.conv(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.head(self.pool(x).flatten(1))


def _randomized(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.3)
    return model


SHAPES = {  # in, out, kernel, stride, padding, dilation
    "shrink by 2": (8, 4, 1, 1, 0, 1),
    "shrink by 8/3": (8, 3, 3, 1, 1, 1),
    "widen by 2": (4, 8, 3, 1, 1, 1),
    "widen by 3/2": (4, 6, 1, 1, 0, 1),
    "stride 2 pad 0": (6, 6, 3, 2, 0, 1),
    "stride 2 pad 1": (6, 10, 3, 2, 1, 1),
    "stride 2 kernel 2": (6, 4, 2, 2, 0, 1),
    "pad beyond the size": (6, 6, 1, 1, 1, 1),
    "dilated, size shrinks": (6, 6, 3, 1, 1, 2),
}


# each shape plain and gated on an odd input side, and on an even one where the stride or the crop meets it
CASES = [(shape, 7, form) for shape in SHAPES for form in (True, "gated")] + [
    (shape, 8, form) for shape in SHAPES if SHAPES[shape][3] > 1 or "size" in shape for form in (True, "gated")]


@pytest.mark.parametrize("shape, side, form", CASES)
@torch.no_grad()
def test_every_shape_reloads_bit_identical_and_runs_bitwise_exactly(shape, side, form, backends, monkeypatch,
                                                                     tmp_path):
    torch.manual_seed(0)
    cin, cout, k, s, p, d = SHAPES[shape]
    x = torch.randn(3, 3, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = irconvert.binarize(_randomized(Chain(cin, cout, k, s, p, d)).eval(), shortcut=form, calibrate=x,
                                 w1a1_min_fan_in=0).eval()  # W1A1 however narrow: the shortcut is on W1A1 convs
    assert net.irconvert_plan.layers["conv"].mode == "W1A1" and dict(net.irconvert_plan.shortcuts) == {"conv": "bn1"}
    for g in [p for n, p in net.named_parameters() if n.endswith("shortcut_gate")]:
        g.normal_()  # an open gate, so that the shortcut is in the outputs compared
    # the shortcut is what the model adds: its bn1 output minus the plain BatchNorm's is g * S(conv's input)
    seen = {}
    net.conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0]))
    net.bn1.register_forward_hook(lambda m, a, out: seen.__setitem__("bn", (a[0], out)))
    net(x)
    a, out = seen["bn"]
    bn = net.bn1
    plain = F.batch_norm(a, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps)
    short = bireal_shortcut(seen["in"], net.conv.stride, cout, tuple(out.shape[-2:]))
    gate = getattr(bn, "shortcut_gate", None)
    torch.testing.assert_close(out, plain + (short if gate is None else gate.view(1, -1, 1, 1) * short))
    assert short.abs().sum() > 0
    path = irconvert.save_packed(net, tmp_path / "packed.safetensors")
    sim = irconvert.load_packed(path, model=Chain(cin, cout, k, s, p, d))
    assert sim.irconvert_plan.shortcuts == net.irconvert_plan.shortcuts and max_abs_diff(net, sim, x) == 0.0
    bitwise = rt.load(path, model=Chain(cin, cout, k, s, p, d))
    assert bitwise.irconvert_runtime["conv"] == "bitwise" and isinstance(bitwise, torch.fx.GraphModule)
    # the fused plan keeps the shortcut's conv and BatchNorm as they are, and fuses around them
    assert bitwise.irconvert_runtime.fusion["conv"] == "not fused: the Bi-Real shortcut reads its float input"
    want = sim(x)
    from helpers import run_all

    for y in run_all(monkeypatch, backends, lambda: bitwise(x)).values():
        assert torch.equal(y, want)


class Block(nn.Module):
    """A ResNet basic block, with a 1x1 downsample conv when the shapes change."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + (x if self.down is None else self.down(x)))


class Net(nn.Module):
    """stem, a residual block, a downsampling block, a plain conv with no sum around it, a head."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.block1, self.block2 = Block(8, 8, 1), Block(8, 16, 2)
        self.conv, self.bn, self.act = nn.Conv2d(16, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU()
        self.conv_head, self.bn_head, self.act_head = nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 4)

    def forward(self, x):
        x = self.block2(self.block1(self.act0(self.bn0(self.stem(x)))))
        x = self.act_head(self.bn_head(self.conv_head(self.act(self.bn(self.conv(x))))))
        return self.head(self.pool(x).flatten(1))


def _plan(model, **fields):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = irconvert.binarize(model, calibrate=torch.randn(2, 3, 16, 16), **{"w1a1_min_fan_in": 0, **fields})
    return net.irconvert_plan, [str(w.message) for w in caught]


def test_auto_puts_a_shortcut_only_where_no_real_valued_path_goes_around_the_conv():
    assert Policy().shortcut == "auto" and Policy().shortcut_width
    the_plan, said = _plan(Net(), shortcut_width=False, keep_projections=False)  # the path rule alone, a binary downsample
    reasons = the_plan.shortcut_reasons
    # the residual block's sum spans both convs; in the downsampling block every path is binary until the
    # downsample gets its shortcut (visited first, the last in the graph), which then spans conv1 and conv2
    assert dict(the_plan.shortcuts) == {"block2.down.0": "block2.down.1", "conv": "bn"}
    assert reasons["block1.conv1"] == reasons["block1.conv2"] == SHORTCUT_AROUND
    assert reasons["block2.conv1"] == reasons["block2.conv2"] == SHORTCUT_AROUND
    assert reasons["conv"] == reasons["block2.down.0"] == SHORTCUT_ADDED
    assert the_plan.layers["conv_head"].mode == "W1A32" and "conv_head" not in reasons  # only W1A1 convs count
    assert any("shortcut auto: a Bi-Real shortcut on 2 of 6 W1A1 convs" in w for w in said)
    # gated: the same places
    gated, _ = _plan(Net(), shortcut="auto-gated", shortcut_width=False, keep_projections=False)
    assert gated.shortcuts == the_plan.shortcuts and gated.policy.shortcut_gated
    # a full-precision downsample (keep_projections, the default, or a pattern) is a real-valued path already:
    # no shortcut in the block at all
    for fields in ({}, {"patterns": {"*.down.0": "keep"}, "keep_projections": False}):
        kept, _ = _plan(Net(), shortcut_width=False, **fields)
        assert dict(kept.shortcuts) == {"conv": "bn"} and kept.layers["block2.down.0"].mode is None
    # every conv: true; none: false
    every, _ = _plan(Net(), shortcut=True, keep_projections=False)
    assert len(every.shortcuts) == 6
    none, said = _plan(Net(), shortcut=False)
    assert none.shortcuts == () and none.shortcut_reasons == {} and not any("shortcut" in w for w in said)


def test_shortcut_width_adds_one_on_every_conv_that_changes_the_channel_count():
    from irconvert.plan import SHORTCUT_WIDTH

    the_plan, said = _plan(Net(), keep_projections=False)  # the default, with a binary downsample
    reasons = the_plan.shortcut_reasons
    # block2.conv1 (8 -> 16), block2.down.0 (8 -> 16) and conv (16 -> 12) change the width; block1's convs do not,
    # and block2.conv2 (16 -> 16) is spanned by the downsample's shortcut
    assert {n for n, r in reasons.items() if r == SHORTCUT_WIDTH} == {"block2.conv1", "block2.down.0", "conv"}
    assert reasons["block1.conv1"] == reasons["block1.conv2"] == reasons["block2.conv2"] == SHORTCUT_AROUND
    assert dict(the_plan.shortcuts) == {"block2.conv1": "block2.bn1", "block2.down.0": "block2.down.1", "conv": "bn"}
    assert any("a Bi-Real shortcut on 3 of 6 W1A1 convs" in w for w in said)
    default, _ = _plan(Net())  # the downsample full precision: the other two stay
    assert dict(default.shortcuts) == {"block2.conv1": "block2.bn1", "conv": "bn"}


def test_a_residual_network_converts_as_before_under_auto():
    """ResNet with its downsample kept (the quickstart's policy): a sum around every block, so auto adds nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), Block(8, 8, 1), Block(8, 8, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    auto, said = _plan(model)
    off, _ = _plan(model, shortcut=False)
    assert auto.shortcuts == () and {n: p.mode for n, p in auto.layers.items()} == {n: p.mode for n, p in off.layers.items()}
    assert set(auto.shortcut_reasons.values()) == {SHORTCUT_AROUND} and not any("shortcut" in w for w in said)


def test_older_policy_values_still_validate_and_reload(tmp_path):
    for value in (False, True, "gated", "auto", "auto-gated"):
        assert Policy(shortcut=value).shortcut == value
    with pytest.raises(ValueError):
        Policy(shortcut="sometimes")
    # a file written before `auto` existed records shortcut false or true; its own list rebuilds it
    net = irconvert.binarize(Net(), calibrate=torch.randn(2, 3, 16, 16), shortcut=True)
    path = irconvert.save_packed(net, tmp_path / "p.safetensors")
    again = irconvert.load_packed(path, model=Net())
    assert again.irconvert_plan.policy.shortcut is True and again.irconvert_plan.shortcuts == net.irconvert_plan.shortcuts
