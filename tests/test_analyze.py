"""The analysis (torch.fx graph): first and last layers, depthwise convs, the fallback for untraceable models, the ReLUs that feed binary layers."""

import pytest
import timm
import torch
import torchvision
from torch import nn

import irconvert
from irconvert.analyze import analyze
from irconvert.layers import BinaryMixin


class Masked(nn.Module):
    """A head run only for the default argument, as timm's Hiera: `if mask is None: x = self.forward_head(x)`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.mid = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 2)

    def forward(self, x, mask=None):
        x = self.mid(torch.relu(self.conv(x)))
        if mask is None:
            x = self.fc(x.mean((2, 3)))
        return x


CASES = [
    # (builder, first, last, depthwise count)
    (lambda: timm.create_model("resnet18"), {"conv1"}, {"fc"}, 0),
    (lambda: timm.create_model("mobilenetv2_100"), {"conv_stem"}, {"classifier"}, 17),
    (lambda: timm.create_model("efficientnet_b0"), {"conv_stem"}, {"classifier"}, 16),
    (lambda: timm.create_model("convnext_atto"), {"stem.0"}, {"head.fc"}, 12),
    (lambda: timm.create_model("vit_tiny_patch16_224"), {"patch_embed.proj"}, {"head"}, 0),
    # the head behind `if mask is None` (fx would trace the proxy `mask` as not None and leave it out)
    (Masked, {"conv"}, {"fc"}, 0),
    (lambda: timm.create_model("hiera_tiny_224"), {"patch_embed.proj"}, {"head.fc"}, 0),
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


class Gated(nn.Module):
    """A squeeze-excitation gate, a gated linear unit and a plain product: only the first is a gate branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.reduce = nn.Conv2d(8, 2, 1)
        self.expand = nn.Conv2d(2, 8, 1)
        self.value = nn.Conv2d(8, 8, 1)
        self.glu = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        x = x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        x = self.value(x) * torch.sigmoid(self.glu(x))  # GLU: x does not feed the gate through a pooling
        x = x * torch.sigmoid(x)  # SiLU written out: no layer on the gate side
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("build, gates, readers", [
    (Gated, {"reduce", "expand"}, {"value", "glu"}),  # both read the SE product; the GLU's product is no gate
    (lambda: timm.create_model("mobilenetv3_large_100"), 16, 8),  # 8 SE blocks, each read by its conv_pwl
    # torchvision's SqueezeExcitation: fc1, fc2 in each of 16 blocks, read by the project conv (block.3.0, or
    # block.2.0 in the first block, which has no expand conv)
    (lambda: torchvision.models.efficientnet_b0(), 32, 16),
    (lambda: timm.create_model("resnest14d"), 8, 0),  # split attention's fc1, fc2; its products are summed first
    (lambda: timm.create_model("resnet18"), 0, 0),
    (lambda: timm.create_model("vit_tiny_patch16_224"), 0, 0),
])
def test_gate_branches_and_their_readers_are_found(build, gates, readers):
    layers = analyze(build()).layers
    found = {n for n, f in layers.items() if f.gate}
    assert (found == gates) if isinstance(gates, set) else (len(found) == gates)
    read = {n for n, f in layers.items() if f.gated_input}
    assert (read == readers) if isinstance(readers, set) else (len(read) == readers)
    if isinstance(build(), torchvision.models.EfficientNet):
        assert "features.1.0.block.2.0" in read and all(n.endswith(".block.3.0") for n in read - {"features.1.0.block.2.0"})


def test_a_gated_reader_is_w1a32_unless_the_policy_says_otherwise():
    """sign(x * g) = sign(x) for a positive gate: a W1A1 reader of the product would not see the gate."""
    plan = irconvert.binarize(Gated(), w1a1_min_fan_in=0).irconvert_plan.layers  # tiny layers: W1A1 as the policy says
    assert plan["value"].mode == "W1A32" and "gated product" in plan["value"].reason
    assert irconvert.binarize(Gated(), gated_input="binary", w1a1_min_fan_in=0).irconvert_plan.layers["value"].mode == "W1A1"
    assert irconvert.binarize(Gated(), gated_input="keep").irconvert_plan.layers["value"].mode is None
    assert irconvert.binarize(Gated(), mode="W1A32").irconvert_plan.layers["value"].mode == "W1A32"
    assert irconvert.binarize(Gated(), patterns={"value": "W1A1"}).irconvert_plan.layers["value"].mode == "W1A1"


@pytest.mark.parametrize("build", [Gated, lambda: timm.create_model("mobilenetv3_large_100")])
def test_gates_stay_full_precision_unless_the_policy_says_otherwise(build):
    gates = {n for n, f in analyze(build()).layers.items() if f.gate}
    assert gates
    kept = irconvert.binarize(build()).irconvert_plan.layers
    assert all(kept[n].mode is None and kept[n].reason.startswith("gate") for n in gates)
    binary = irconvert.binarize(build(), keep_gates=False).irconvert_plan.layers
    assert all(binary[n].mode is not None for n in gates)


class Branches(nn.Module):
    """A residual block with a 1x1 projection on its shorter side, then three equal branches and an identity
    summed in one chain (RepVGG's shape): only the projection is on a shorter side."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Conv2d(8, 16, 1)
        self.b3 = nn.Conv2d(16, 16, 3, padding=1)
        self.b1 = nn.Conv2d(16, 16, 1)
        self.b5 = nn.Conv2d(16, 16, 5, padding=2)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.conv2(torch.relu(self.conv1(x))) + self.proj(x)
        x = self.b3(x) + self.b1(x) + self.b5(x) + x
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("build, found", [
    (Branches, {"proj"}),
    (lambda: timm.create_model("resnet18"), {"layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"}),
    (lambda: torchvision.models.resnet50(), 4),  # layer1's too: 64 -> 256 channels
    (lambda: timm.create_model("ghostnet_100"), 10),  # depthwise + 1x1 shortcuts of the blocks that change shape
    (lambda: timm.create_model("repvgg_a0"), 0),  # equal branches, summed
    (lambda: timm.create_model("mobileone_s0"), 0),
    (lambda: timm.create_model("mobilenetv2_100"), 0),  # identity shortcuts only
])
def test_projection_shortcuts_are_found_on_the_shorter_side_of_a_sum(build, found):
    got = {n for n, f in analyze(build()).layers.items() if f.projection}
    assert (got == found) if isinstance(found, set) else (len(got) == found)


def test_projections_stay_full_precision_unless_the_policy_says_otherwise():
    assert irconvert.binarize(Branches(), keep_projections=False, w1a1_min_fan_in=0).irconvert_plan.layers["proj"].mode == "W1A1"
    kept = irconvert.binarize(Branches(), w1a1_min_fan_in=0).irconvert_plan.layers
    assert kept["proj"].mode is None and kept["proj"].reason.startswith("projection shortcut")
    assert kept["b1"].mode == "W1A1" and kept["conv2"].mode is not None  # W1A32: fed by a functional relu


from timm.layers import register_notrace_module  # noqa: E402

from irconvert.graph import opaque_leaves, trace  # noqa: E402


@register_notrace_module
class ShapeBranchingBlock(nn.Module):
    """A timm notrace block, as MobileViT's: it branches on its input's shape, which symbolic fx cannot,
    and holds a squeeze-excitation gate and a residual sum that the structure rules must see."""

    def __init__(self, c: int = 16, data_branch: bool = False):
        super().__init__()
        self.data_branch = data_branch
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        if (x.sum() > 0) if self.data_branch else (x.shape[-1] % 2):  # data: no trace opens it
            x = x * 1.0
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y * torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return x + self.bn2(self.conv2(y))


class WithBlock(nn.Module):
    def __init__(self, data_branch: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = ShapeBranchingBlock(16, data_branch)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_the_structure_rules_see_inside_a_timm_notrace_block_traced_on_meta_tensors():
    model = WithBlock()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    assert opaque_leaves(model, trace(model)) == ["block"]  # symbolic fx: the block is one node
    closed, opened = analyze(model), analyze(model, (torch.zeros(2, 3, 9, 9),))
    assert not closed.layers["block.fc1"].gate and not closed.layers["block.fc2"].gate
    assert opened.layers["block.fc1"].gate and opened.layers["block.fc2"].gate  # squeeze-excitation, found
    assert ("block.conv2",) in opened.flow.layers and ("block.conv2",) not in closed.flow.layers
    assert opened.norm_after["block.conv1"] == "block.bn1" and "block.conv1" not in closed.norm_after
    # the meta copy it traced left the model as it was: its tensors on the CPU, with the same values
    assert all(p.device.type == "cpu" and torch.equal(p, before[n]) for n, p in model.state_dict().items())
    student = irconvert.binarize(model, calibrate=torch.randn(4, 3, 9, 9))
    assert type(student.block.fc1) is nn.Conv2d and type(student.block.fc2) is nn.Conv2d  # keep_gates holds
    assert isinstance(student.block.conv1, BinaryMixin)


def test_a_notrace_block_that_branches_on_data_stays_one_node():
    model = WithBlock(data_branch=True)
    opened = analyze(model, (torch.zeros(2, 3, 9, 9),))
    assert opened.traced and not opened.layers["block.fc1"].gate
    assert opened.flow.layers == analyze(model).flow.layers  # the closed graph, as without an example


def test_nf_regnet_keeps_its_squeeze_excitation_and_projections_real_valued():
    """NF-RegNet's NormFreeBlock is a timm notrace module: before the graph opened it, its SE convs and its
    downsample projections were binarized like any conv (zoo_real: 53.4 points below its FP twin)."""
    model = timm.create_model("nf_regnet_b0").eval()
    student = irconvert.binarize(model, calibrate=torch.randn(2, 3, 64, 64))
    block = student.stages[1][0]
    assert type(block.attn.fc1) is nn.Conv2d and type(block.attn.fc2) is nn.Conv2d
    assert not isinstance(block.downsample.conv, BinaryMixin)
    assert isinstance(block.conv3, BinaryMixin)
