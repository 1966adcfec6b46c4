"""Model zoo: the 40 deployment models convert, train a step and reload exactly from packed.safetensors;
and the converter fixes the full sweep (bench/zoo.py) needed, each on a model small enough to read.

All of it takes about 40 s on one core (0.3-3 s a model at 64x64), so nothing is marked slow. The full
sweep over every timm family and torchvision classifier is `python -m bench.zoo` (about 16 minutes on 2 cores).
"""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import irconvert
from irconvert.analyze import analyze
from irconvert.models import create_model, split_name
from irconvert.verify import max_abs_diff

from bench.zoo_lists import FAST

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models on 2 shared cores: one thread is 10-50x faster than two that wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _runs(model: nn.Module, side: int) -> bool:
    try:
        with torch.no_grad():
            model.train()(torch.randn(2, 3, side, side))
        return True
    except Exception:
        return False


def build_small(spec: str) -> tuple[nn.Module, int]:
    """Return (model with 10 classes, input side): 64x64, with img_size=64 for fixed-size timm models, else native."""
    torch.manual_seed(0)
    model = create_model(spec, num_classes=10)
    if _runs(model, 64):
        return model, 64
    if split_name(spec)[0] == "timm":
        try:
            small = create_model(spec, num_classes=10, img_size=64)
            if _runs(small, 64):
                return small, 64
        except Exception:
            pass
    return model, model.pretrained_cfg["input_size"][-1]


def outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in outputs(o)] if isinstance(out, (tuple, list)) else []


# the ones over about 4 s on 2 cores: the whole suite runs them, the quick loop the other 29
HEAVY = {"resnet50", "mobileone_s0", "efficientnetv2_rw_t", "efficientformer_l1", "tiny_vit_5m_224", "levit_128s",
         "densenet121", "torchvision:resnet18", "torchvision:resnet50", "torchvision:regnet_y_400mf",
         "torchvision:convnext_tiny"}


@pytest.mark.parametrize("spec", [pytest.param(s, marks=pytest.mark.slow) if s in HEAVY else s for s in FAST])
def test_zoo_model_converts_trains_and_reloads_exactly(spec, tmp_path):
    model, side = build_small(spec)
    del model.irconvert_origin  # as if built by timm / torchvision itself: the file must name it alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = irconvert.binarize(model, inplace=True, calibrate=torch.randn(4, 3, side, side))
    assert net.irconvert_origin["name"] == split_name(spec)[1]
    layers = dict(irconvert.binary_layers(net))
    assert layers, "nothing was binarized"

    net.train()
    loss = sum(t.float().pow(2).mean() for t in outputs(net(torch.randn(2, 3, side, side))))
    loss.backward()
    grads = [m.latent_weight.grad for m in layers.values()]
    assert any(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    torch.optim.SGD(net.parameters(), lr=1e-3).step()

    path = irconvert.save_packed(net, tmp_path / "packed.safetensors")
    loaded = irconvert.load_packed(path)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        y = outputs(net.eval()(x))
    assert all(torch.isfinite(t).all() for t in y)
    assert max_abs_diff(net, loaded, x) <= 1e-5


def test_fast_list_is_40_buildable_models_of_both_sources():
    assert len(FAST) == len(set(FAST)) == 40
    tv = set(torchvision.models.list_models(module=torchvision.models))
    for spec in FAST:
        source, name = split_name(spec)
        assert (name in tv) if source == "torchvision" else timm.is_model(name), spec


# ---------------------------------------------------------------- the converter fixes


def _grad_norm(net: nn.Module, side: int) -> float:
    net.train()
    net(torch.randn(2, 3, side, side)).pow(2).mean().backward()
    return float(torch.sqrt(sum(p.grad.double().pow(2).sum() for p in net.parameters() if p.grad is not None)))


def test_gain_keeps_a_binary_transformer_trainable():
    # +-1 weights where the pretrained ones were ~0.02 multiply gradients ~50x per layer in the
    # residual branches; 12 blocks took DeiT-tiny's gradient far past anything trainable
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=64)
    torch.manual_seed(0)
    paper = _grad_norm(irconvert.binarize(model, keep_magnitude=False), 64)
    torch.manual_seed(0)
    kept = _grad_norm(irconvert.binarize(model), 64)
    assert kept < 1e3 < 1e9 < paper


def test_gain_is_the_weight_magnitude_and_cancels_under_batchnorm():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Hardtanh(), nn.Conv2d(8, 16, 3),
                          nn.BatchNorm2d(16), nn.Hardtanh(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4))
    std = float(block[3].weight.detach().std())  # kaiming-uniform: 1 / sqrt(3 * 72) = 0.068
    a = irconvert.binarize(block)
    b = irconvert.binarize(block, keep_magnitude=False)
    assert a[3].binary_gain == round(math.log2(std)) == -4 and b[3].binary_gain == 0
    torch.testing.assert_close(a[3].weight, b[3].weight * 2.0**-4, rtol=0, atol=0)
    x = torch.randn(4, 3, 10, 10)
    a.train(), b.train()
    # BatchNorm takes the scale out; only its eps (1e-5 against a variance of ~0.3) tells them apart
    torch.testing.assert_close(a[:5](x), b[:5](x), rtol=1e-3, atol=1e-3)


def test_packed_exponent_carries_the_gain_and_reloads(tmp_path):
    from safetensors.torch import load_file

    net = irconvert.binarize(create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8))
    name, layer = next(iter(irconvert.binary_layers(net)))
    assert layer.binary_gain < 0
    path = irconvert.save_packed(net, tmp_path / "packed.safetensors")
    exp = load_file(str(path))[f"{name}.weight.exp"]
    want = layer.binarizer.exponent(layer.latent_weight.detach()) + layer.binary_gain
    assert torch.equal(exp.to(torch.int32), want.to(torch.int32))
    loaded = irconvert.load_packed(path)
    assert torch.equal(loaded.get_submodule(name).weight, layer.weight.detach())
    assert max_abs_diff(net, loaded, torch.randn(2, 3, 32, 32)) == 0


class FunctionalQKV(nn.Module):
    """Attention projections read as weights (BEiT's F.linear(x, self.qkv.weight, qkv_bias)) and through nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.qkv = nn.Linear(16, 48)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q, k, v)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return self.head(self.mlp(x).mean(1))


def test_layers_whose_weight_is_read_directly_are_w1a32():
    a = analyze(FunctionalQKV())
    assert not a.layers["qkv"].called and not a.layers["mha.out_proj"].called and a.layers["mlp"].called
    net = irconvert.binarize(FunctionalQKV(), calibrate=torch.randn(4, 5, 8), features="binary",
                            w1a1_min_fan_in=0)  # mlp: W1A1, narrow as it is
    modes = {n: p.mode for n, p in net.irconvert_plan.layers.items()}
    # nn.MultiheadAttention's projections become called layers (irconvert.attention): binary like the rest
    assert modes == {"stem": None, "qkv": "W1A32", "mha.out_proj": "W1A1", "mha.in_proj": "W1A1", "mlp": "W1A1",
                     "head": None}
    net(torch.randn(2, 5, 8)).sum().backward()
    assert net.qkv.latent_weight.grad is not None


def test_reloaded_1x1_conv_weight_has_standard_strides(tmp_path):
    # .contiguous() after a permute keeps odd strides on a 1x1 kernel's size-1 dims; conv then takes
    # the channels-last path and rounds differently, which W1A1 signs downstream amplify
    net = irconvert.binarize(create_model("torchvision:squeezenet1_1", num_classes=10))
    loaded = irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"))
    w = loaded.features[3].squeeze.weight
    assert w.shape[-2:] == (1, 1) and w.stride() == torch.empty(w.shape).stride()
    assert max_abs_diff(net, loaded, torch.randn(2, 3, 64, 64)) == 0


def test_modules_that_check_their_state_dict_version_reload(tmp_path):
    net = irconvert.binarize(create_model("torchvision:mnasnet0_5", num_classes=10))  # MNASNet refuses a missing version
    loaded = irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"))
    assert max_abs_diff(net, loaded, torch.randn(2, 3, 64, 64)) == 0


# ---------------------------------------------------------------- self-contained packed files


@pytest.mark.parametrize("build, origin", [
    (lambda: timm.create_model("resnet18"), ("resnet18", "timm", {})),
    (lambda: timm.create_model("resnet18", num_classes=3, in_chans=1, global_pool="max"),
     ("resnet18", "timm", {"num_classes": 3, "in_chans": 1, "global_pool": "max"})),
    (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32),
     ("vit_tiny_patch16_224", "timm", {"num_classes": 7, "img_size": 32})),
    (lambda: torchvision.models.resnet18(num_classes=5), ("resnet18", "torchvision", {"num_classes": 5})),
    (lambda: torchvision.models.googlenet(num_classes=4, aux_logits=False, init_weights=True),
     ("googlenet", "torchvision", {"num_classes": 4, "aux_logits": False})),
])
def test_models_built_outside_irconvert_reload_without_the_architecture(build, origin, tmp_path):
    torch.manual_seed(0)
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = irconvert.binarize(model)
    o = net.irconvert_origin
    assert (o["name"], o["source"], o["kwargs"]) == origin
    loaded = irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"))
    chans = origin[2].get("in_chans", 3)
    assert max_abs_diff(net, loaded, torch.randn(1, chans, 32, 32)) == 0


def test_user_model_has_no_origin_and_says_so(tmp_path):
    net = irconvert.binarize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 2, 1)))
    assert net.irconvert_origin is None
    with pytest.raises(irconvert.IRConvertError, match="model=MyNet"):
        irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"))


def test_a_model_that_does_not_learn_names_its_small_head_retry():
    from bench.zoo_check import _record, criteria_failure

    rec = dict(_record("m", "timm"), live_min=0.4, grad_ratio=0.1, loss_drop=-0.21, loss_drop_small_head=0.41)
    assert criteria_failure(rec) == ("20 AdamW steps lowered the loss (mean of the last 5) by -21.0% (< 10%); "
                                     "with the classifier from N(0, 0.01): 41.0%")
    assert criteria_failure(dict(rec, loss_drop_small_head=None)).endswith("(< 10%)")
    assert criteria_failure(dict(rec, loss_drop=0.3)) is None


def test_the_learn_check_measures_the_loss_without_dropout_and_from_the_last_steps():
    """A fixed batch's loss is a function of the parameters (dropout and drop-path off, BatchNorm training),
    and the loss the steps reached is the mean of the last five: one lucky or unlucky last step of a
    chaotic curve does not decide the verdict."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    from bench.zoo_check import loss_of, relative_drop, train_deterministic

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Dropout2d(0.5), DropPath(0.5),
                        StochasticDepth(0.5, "row"), nn.Flatten(), nn.Dropout(0.5), nn.LazyLinear(10))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    train_deterministic(net)
    first, second = loss_of(net(x), y), loss_of(net(x), y)
    assert torch.equal(first, second)
    assert net[1].training and not net[2].training and not net[3].training and not net[4].training
    net.train()  # the same model with its regularizers on: two draws differ
    assert not torch.equal(loss_of(net(x), y), loss_of(net(x), y))

    curve = [2.0] + [1.0] * 15 + [2.4, 0.2, 2.4, 0.2, 0.2]  # ends on a lucky step
    assert relative_drop(curve) == pytest.approx(1 - 1.08 / 2.0)
    assert relative_drop([2.0] * 20 + [0.2]) == pytest.approx(1 - 1.64 / 2.0)
    assert relative_drop([0.0, 0.0]) == 0.0


def test_small_head_redraws_a_single_linear_classifier_only():
    from bench.zoo_check import small_head

    model = timm.create_model("mobilenetv2_050", num_classes=10)
    assert model.get_classifier().weight.abs().max() > 0.1  # timm's U(+-1/sqrt(10))
    assert small_head(model)
    head = model.get_classifier()
    assert float(head.weight.std()) == pytest.approx(0.01, rel=0.3) and not head.bias.any()
    assert not small_head(nn.Sequential(nn.Conv2d(3, 4, 1)))
    dla = timm.create_model("dla34", num_classes=10)  # its classifier is a 1x1 conv
    assert small_head(dla) and float(dla.get_classifier().weight.std()) == pytest.approx(0.01, rel=0.3)


def test_sensitivity_restores_the_parameters_and_tells_a_step_function_from_a_smooth_one():
    """The chaos measure: a smooth model's loss moves by about its gradient times the step, a model whose
    output jumps at a parameter's value moves by the jump; the parameters are the same afterwards."""
    from bench.zoo_check import SENSITIVITY_STEP, sensitivity

    class Jump(nn.Module):
        def __init__(self, at_edge: bool):
            super().__init__()
            self.head = nn.Linear(6, 10)
            self.threshold = nn.Parameter(torch.zeros(4) if at_edge else torch.ones(4))

        def forward(self, x):  # a sign's output: +3 on every logit of class 0 while any threshold is > 0
            return self.head(x) + 3.0 * (self.threshold.detach() > 0).any() * F.one_hot(torch.tensor(0), 10)

    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.arange(8)
    for at_edge in (False, True):
        net = Jump(at_edge)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        value = sensitivity(net, x, y)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
        assert (value > 0.05) if at_edge else (value < 100 * SENSITIVITY_STEP)


def test_a_chaotic_model_that_does_not_learn_says_so():
    from bench.zoo_check import _record, criteria_failure

    rec = dict(_record("m", "timm"), live_min=0.4, grad_ratio=0.1, loss_drop=-0.21, loss_drop_small_head=None,
               sensitivity=0.205, sensitivity_fp=0.0027)
    assert criteria_failure(rec) == ("20 AdamW steps lowered the loss (mean of the last 5) by -21.0% (< 10%); "
                                     "chaotic: a ±1e-5 step on every parameter moves the loss by 20.5% "
                                     "(FP: 0.27%)")
    assert criteria_failure(dict(rec, sensitivity=0.01)).endswith("(< 10%)")


@pytest.mark.slow  # a fresh process each
@pytest.mark.parametrize("value, says", [("shortcut=gated", "a string needs its quotes: --set 'shortcut=\"gated\"'"),
                                          ("no_such=1", "no_such: Extra inputs are not permitted")])
def test_probe_refuses_a_bad_policy_field_in_one_line(value, says):
    proc = subprocess.run([sys.executable, "-m", "bench.zoo_probe", "resnet18", "--set", value],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert says in proc.stderr.strip().splitlines()[-1]


def test_probe_records_one_row_per_command_without_its_record_flag(tmp_path, monkeypatch):
    import json

    import bench.common
    from bench import zoo_probe

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    for argv, top1 in ((["m", "--fashion", "3"], 20.0), (["m", "--fashion", "3", "--set", 'a="b"'], 30.0),
                       (["m", "--fashion", "3"], 25.0)):
        monkeypatch.setattr(sys, "argv", ["zoo_probe.py", *argv, "--record", "t"])
        zoo_probe.record("t", {"top1": top1, "losses": [2.3, 1.0], "seconds": 1.0})
    rows = json.loads((tmp_path / "t.json").read_text())
    assert [(r["command"], r["top1"]) for r in rows] == [
        ("python -m bench.zoo_probe m --fashion 3 --set 'a=\"b\"'", 30.0), ("python -m bench.zoo_probe m --fashion 3", 25.0)]
    assert "| `python -m bench.zoo_probe m --fashion 3` | - | 25.0 | - | 2.30 -> 1.00 | 1 |" in (tmp_path / "t.md").read_text()


def test_a_curve_that_stops_at_the_label_prior_is_named():
    from bench.zoo_check import at_label_prior, label_prior_loss, sweep_batch

    size = [3, 224, 224]
    labels = sweep_batch(tuple(size))[1]
    counts = torch.bincount(labels, minlength=10)[torch.bincount(labels, minlength=10) > 0].double() / 4
    assert label_prior_loss(size) == pytest.approx(float(-(counts * counts.log()).sum()))
    prior = label_prior_loss(size)
    flat = [2.3026, 1.7, 1.2] + [prior + 0.001] * 18
    rec = {"loss_curve": flat, "loss_last": prior + 0.001, "input_size": size}
    assert at_label_prior(rec)
    assert not at_label_prior(dict(rec, loss_curve=flat[:-10] + [0.5] * 10, loss_last=0.5))
    assert not at_label_prior(dict(rec, loss_curve=None))
