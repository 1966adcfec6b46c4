"""The training levers of stage 5: optimizer groups, LR schedules, BatchNorm re-estimation, attention transfer."""

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import irconvert
from irconvert.distill import FeatureTap, attention_loss, attention_map, default_layers
from irconvert.errors import IRConvertError
from irconvert.recipe import DistillSection, Schedule
from irconvert.train import Stage, fit, make_optimizer, reestimate_bn


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_reestimate_bn_is_the_plain_average_of_the_batches():
    bn = nn.BatchNorm1d(3)
    model = nn.Sequential(bn).eval()
    bn.running_mean.fill_(100.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, generator=g) * 2 + 5, torch.zeros(8)) for _ in range(3)]
    used = reestimate_bn(model, batches, 2, torch.device("cpu"))
    assert used == 2
    x1, x2 = batches[0][0], batches[1][0]
    torch.testing.assert_close(bn.running_mean, (x1.mean(0) + x2.mean(0)) / 2)
    torch.testing.assert_close(bn.running_var, (x1.var(0) + x2.var(0)) / 2)  # unbiased, as BatchNorm keeps it
    assert bn.momentum == 0.1 and not model.training  # restored


def test_latent_binary_weights_get_their_own_weight_decay():
    model = irconvert.binarize(small_net())
    binary = dict(irconvert.binary_layers(model))["3.0"]
    kept = model[0]  # the first conv stays full precision
    opt, _ = make_optimizer(model, Schedule(lr=0.1, weight_decay=0.5, latent_weight_decay=0.0, scheduler="none"), 1)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(binary.latent_weight)] == 0.0
    assert decay[id(kept.weight)] == 0.5
    assert decay[id(kept.bias)] == 0.0 and decay[id(model[1].weight)] == 0.0
    # with zero gradients, AdamW's step is the decay alone: lr * wd shrinks the FP weight, not the latent one
    before_latent, before_kept = binary.latent_weight.detach().clone(), kept.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(binary.latent_weight.detach(), before_latent)
    torch.testing.assert_close(kept.weight.detach(), before_kept * (1 - 0.1 * 0.5))


def test_default_keeps_one_weight_decay_for_all_weights():
    model = irconvert.binarize(small_net())
    opt, _ = make_optimizer(model, Schedule(weight_decay=0.5, scheduler="none"), 1)
    binary = dict(irconvert.binary_layers(model))["3.0"]
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay[id(binary.latent_weight)] == 0.5


def test_linear_schedule_falls_to_min_lr_in_a_straight_line():
    model = nn.Linear(2, 2)
    opt, sched = make_optimizer(model, Schedule(epochs=2, lr=1.0, min_lr=0.0, scheduler="linear"), 5)
    lrs = []
    for step in (0, 5, 10):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([1.0, 0.5, 0.0])


def test_attention_map_and_loss_against_hand_values():
    a = torch.zeros(1, 2, 1, 2)
    a[0, 0, 0, 0], a[0, 1, 0, 0] = 3.0, 4.0  # channel mean of squares at the two positions: 12.5, 0
    torch.testing.assert_close(attention_map(a), torch.tensor([[1.0, 0.0]]))
    b = torch.zeros(1, 1, 1, 2)
    b[0, 0, 0, 1] = 2.0
    # Q_s = [1, 0], Q_t = [0, 1]: mean of squared differences over the two positions is 1
    assert float(attention_loss({"x": a}, {"x": b})) == pytest.approx(1.0)
    assert float(attention_loss({"x": a}, {"x": 5 * a})) == pytest.approx(0.0)


def test_feature_tap_records_named_outputs_and_names_bad_layers():
    model = timm.create_model("resnet18", num_classes=3, channels=[8, 16, 32, 64])
    assert default_layers(model) == ("layer1", "layer2", "layer3", "layer4")
    tap = FeatureTap(model, ["layer2"])
    model(torch.randn(2, 3, 32, 32))
    assert tap.out["layer2"].shape == (2, 16, 4, 4)
    tap.close()
    with pytest.raises(IRConvertError, match="attention_layers: 'layer9'"):
        FeatureTap(model, ["layer9"])


def _loader(n=32):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator())


def test_attention_transfer_changes_the_binary_training():
    def train(attention: float) -> torch.Tensor:
        torch.manual_seed(0)
        teacher = small_net().eval()
        student = irconvert.binarize(teacher)
        stage = Stage("binary", student, Schedule(epochs=1, lr=0.01), 0, teacher=teacher,
                      distill=DistillSection(attention=attention, attention_layers=("3",)))
        fit(stage, _loader(), _loader(8), torch.device("cpu"))
        assert not student[3]._forward_hooks and not teacher[3]._forward_hooks  # the taps are removed
        return dict(irconvert.binary_layers(student))["3.0"].latent_weight.detach().clone()

    plain, with_at = train(0.0), train(1000.0)
    assert not torch.allclose(plain, with_at)


def test_fit_reestimates_bn_after_the_last_epoch():
    torch.manual_seed(0)
    model = small_net()
    stage = Stage("teacher", model, Schedule(epochs=1, lr=1e-12, bn_reestimate=2, scheduler="none"), 0)
    loader = _loader()
    fit(stage, loader, _loader(8), torch.device("cpu"))
    # lr ~0: the weights did not move, so the statistics are those of the conv output over 2 batches
    assert model[1].num_batches_tracked == 2  # reset, then 2 batches (training saw 4)


def test_two_stage_schedule_trains_w1a32_first_then_w1a1():
    from irconvert.recipe import TrainSection

    torch.manual_seed(0)
    teacher = small_net().eval()
    student = irconvert.binarize(teacher, features="binary")  # "3.0" feeds the head: W1A1 too
    layer = dict(irconvert.binary_layers(student))["3.0"]
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(m.binary_mode) if m.training else None)
    schedule = TrainSection(epochs=3, w1a32_epochs=1, lr=0.01)
    stage = fit(Stage("binary", student, schedule, 0), _loader(), _loader(8), torch.device("cpu"))
    assert seen == ["W1A32"] * 4 + ["W1A1"] * 8  # 4 steps an epoch
    assert [r["mode"] for r in stage.history] == ["W1A32", "W1A1", "W1A1"] and layer.binary_mode == "W1A1"
    with pytest.raises(ValueError, match="w1a32_epochs \\(3\\) must be below epochs \\(3\\)"):
        TrainSection(epochs=3, w1a32_epochs=3)


def _two_binary_layers() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return irconvert.binarize(net, calibrate=False)


def test_flip_rate_is_one_for_a_negated_layer_and_zero_for_an_unchanged_one():
    from irconvert.flips import FlipMeter

    torch.manual_seed(0)
    model = _two_binary_layers()
    layers = dict(irconvert.binary_layers(model))
    assert set(layers) == {"3", "6"}
    meter = FlipMeter(model)
    assert meter.rate() == (0.0, {"3": 0.0, "6": 0.0})
    with torch.no_grad():
        layers["3"].latent_weight.neg_()
    overall, per_layer = meter.rate()
    assert per_layer == {"3": 1.0, "6": 0.0} and overall == 0.5  # both layers hold 8*8*9 weights
    assert meter.rate() == (0.0, {"3": 0.0, "6": 0.0})  # counted since the last look
    with torch.no_grad():  # a quarter of one layer's output channels negated: a quarter of its signs
        layers["6"].latent_weight[:2].neg_()
    assert meter.rate()[1]["6"] == 0.25


def test_fit_logs_the_flip_rate_at_ten_points_an_epoch_and_per_layer_each_epoch():
    torch.manual_seed(0)
    teacher = small_net().eval()
    student = irconvert.binarize(teacher, calibrate=False)
    loader = DataLoader(_loader(80).dataset, batch_size=8, shuffle=True, generator=torch.Generator())
    stage = fit(Stage("binary", student, Schedule(epochs=1, lr=0.05), 0), loader, _loader(8), torch.device("cpu"))
    row = stage.history[0]
    assert [p["step"] for p in row["log"]] == list(range(1, 11))  # 10 steps: a point after each
    assert all(0 <= p["flip_rate"] <= 1 for p in row["log"]) and any(p["flip_rate"] > 0 for p in row["log"])
    assert set(row["flip_rate_layers"]) == {"3.0"} and row["flip_rate"] == row["flip_rate_layers"]["3.0"]
    assert row["flip_rate"] > 0  # lr 0.05 flips signs of 8*8*9 weights within 10 Adam steps
    teacher_row = fit(Stage("teacher", small_net(), Schedule(epochs=1), 0), loader, _loader(8),
                      torch.device("cpu")).history[0]
    assert "flip_rate" not in teacher_row and "flip_rate" not in teacher_row["log"][0]


def _gradients(model, scale=1e3):
    from irconvert.train import _step

    return lambda clip, mode: _step(model, model(torch.randn(4, 1, 8, 8)).pow(2).sum() * scale,
                                    torch.optim.SGD(model.parameters(), lr=0.0), None, clip, mode)


def test_grad_clip_norm_bounds_the_global_gradient_norm():
    torch.manual_seed(0)
    model = _two_binary_layers()
    step = _gradients(model)
    norm = lambda: float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None)))
    step(None, "norm")
    assert norm() > 1.0  # unclipped, this loss's gradient is large
    step(1.0, "norm")
    assert norm() == pytest.approx(1.0, rel=1e-4)


def test_agc_bounds_each_units_gradient_by_its_weight_norm():
    torch.manual_seed(0)
    model = _two_binary_layers()
    step = _gradients(model)
    unit = lambda t: t.flatten(1).norm(dim=1) if t.ndim > 1 else t.norm()
    step(None, "agc")
    w = model[3].latent_weight.detach()
    assert (unit(model[3].latent_weight.grad) > 0.01 * unit(w)).all()  # every unit over the bound unclipped
    step(0.01, "agc")
    ratio = unit(model[3].latent_weight.grad) / unit(w).clamp(min=1e-3)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.01))


def test_latent_lr_std_scales_each_binary_layers_lr_by_its_spread():
    from irconvert.train import latent_spread

    torch.manual_seed(0)
    model = _two_binary_layers()
    with torch.no_grad():
        model[6].latent_weight.copy_(4.0 * model[3].latent_weight)
    spread = {n: latent_spread(m) for n, m in irconvert.binary_layers(model)}
    assert spread["6"] == pytest.approx(4 * spread["3"])
    opt, sched = make_optimizer(model, Schedule(lr=0.01, latent_lr="std", epochs=2), 5)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    a, b = lr[id(model[3].latent_weight)], lr[id(model[6].latent_weight)]
    assert b / a == pytest.approx(4.0) and (a + b) / 2 == pytest.approx(0.01)  # the median of two is their mean
    assert lr[id(model[0].weight)] == 0.01  # full-precision weights keep the recipe's lr
    sched.step_update(5)  # the cosine schedule scales every group alike: the ratio holds
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr[id(model[6].latent_weight)] / lr[id(model[3].latent_weight)] == pytest.approx(4.0)
    # an Adam step of each layer's lr moves w_hat = w / spread alike in both layers
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: m.latent_weight.detach().clone() for n, m in irconvert.binary_layers(model)}
    opt.step()
    moved = {n: float((m.latent_weight.detach() - before[n]).abs().mean()) / spread[n]
             for n, m in irconvert.binary_layers(model)}
    assert moved["3"] == pytest.approx(moved["6"], rel=1e-3)


def test_kd_with_alpha_one_is_the_distribution_loss_alone():
    from irconvert.train import _loss, kd_loss

    torch.manual_seed(0)
    teacher = small_net().eval()
    student = irconvert.binarize(teacher, calibrate=False)
    stage = Stage("binary", student, Schedule(), 0, teacher=teacher, distill=DistillSection(alpha=1.0, temperature=1.0))
    x = torch.randn(4, 1, 8, 8)
    out, loss = _loss(stage, student, x, torch.tensor([0, 1, 2, 0]), True, False)
    _, other = _loss(stage, student, x, torch.tensor([2, 2, 1, 1]), True, False)
    assert float(loss) == pytest.approx(float(other))  # no label term
    assert float(loss) == pytest.approx(float(kd_loss(out, teacher(x), 1.0)))
    stage.distill = DistillSection(alpha=0.9, temperature=1.0)
    assert float(_loss(stage, student, x, torch.tensor([0, 1, 2, 0]), True, False)[1]) != pytest.approx(float(loss))


def test_latent_lr_as_a_number_is_the_step_in_units_of_each_layers_spread():
    from irconvert.train import latent_spread

    torch.manual_seed(0)
    model = _two_binary_layers()
    with torch.no_grad():
        model[6].latent_weight.copy_(4.0 * model[3].latent_weight)
    opt, _ = make_optimizer(model, Schedule(lr=0.01, latent_lr=0.07, epochs=2), 5)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for n, m in irconvert.binary_layers(model):
        assert lr[id(m.latent_weight)] == pytest.approx(0.07 * latent_spread(m))
    assert lr[id(model[0].weight)] == 0.01
    with pytest.raises(Exception):
        Schedule(latent_lr=-1.0)
