"""The bitwise runtime: exact against the float simulation (load_packed), layer by layer and on whole
models, with the compiled kernel and with its PyTorch fallback.

Exactness: a layer without bias is bit-identical to the float simulation (its float conv sums
integers times 2^exp, which float32 does exactly). With a bias the runtime rounds once, so it equals
a float64 reference rounded to float32; PyTorch's float32 conv also rounds partial sums that hold
the bias, so it may differ from that by a few ulp, bounded here by 1e-6 * (|b| + s * fan_in).
"""

import math
from pathlib import Path
import shutil
import subprocess

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import irconvert
import irconvert.runtime as rt
from irconvert.ops import sign
from irconvert.errors import IRConvertError
from irconvert.layers import make_binary
from irconvert.methods import METHODS
from irconvert.models import create_model
from irconvert.pack import binary_weight, fan_in_order, pack_signs
from irconvert.runtime import kernels

from helpers import run_all




def frozen(layer: nn.Module, mode: str = "W1A1"):
    """Make `layer` a frozen binary layer (as load_packed builds) with random signs and exponents."""
    make_binary(layer, METHODS["irnet"], mode)
    shape = tuple(layer.latent_weight.shape)
    signs = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    exp = torch.randint(-5, 2, (shape[0],), dtype=torch.int8)
    bits = pack_signs(fan_in_order(signs))
    layer.freeze(binary_weight(bits, exp, shape))
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    return layer.eval(), bits, exp


def signed_input(*shape):
    """Random input with exact zeros and negative zeros, which sign() must map to +1."""
    x = torch.randn(*shape)
    x[x.abs() < 0.05] = 0.0
    x[(x.abs() > 0.05) & (x.abs() < 0.1)] = -0.0
    return x


def check_exact(y, sim, ref64, bias, scale, fan_in, channel_dim):
    """Assert the runtime's y against the float simulation under the documented tolerance."""
    if bias is None:
        assert torch.equal(y, sim)
        return
    assert torch.equal(y, ref64.float())  # rounded once
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    tol = 1e-6 * (bias.detach().abs() + scale * fan_in).reshape(shape)
    assert ((y - sim).abs() <= tol).all()


CONV_CASES = [
    # n, c_in, c_out, h, w, k, stride, padding, dilation, groups, bias
    (2, 3, 5, 7, 7, 3, 1, 1, 1, 1, False),            # fewer channels than a word
    (2, 70, 33, 9, 11, 3, 2, 1, 1, 1, True),          # odd sizes, stride 2, bias
    (1, 130, 65, 8, 8, 5, 1, 2, 1, 1, False),         # 5x5, pad 2, 3 words per tap
    (2, 64, 40, 10, 10, 3, 1, 2, 2, 1, True),         # dilation 2
    (1, 96, 48, 7, 9, 3, 2, 0, 1, 3, False),          # groups
    (1, 16, 16, 6, 6, 3, 1, 1, 1, 16, True),          # depthwise
    (3, 200, 7, 5, 5, 1, 1, 0, 1, 1, True),           # 1x1
    (1, 100, 24, 13, 13, 1, 2, 0, 1, 1, False),       # 1x1 stride 2 (a ResNet downsample)
    (1, 48, 20, 9, 9, 3, 1, "same", 2, 1, False),     # 'same' with dilation
    (1, 24, 8, 7, 6, 4, 1, "same", 1, 1, True),       # 'same' with an even kernel: more padding bottom/right
    (1, 40, 12, 9, 8, 3, (2, 1), (0, 2), 1, 1, True),  # pairs
    (1, 72, 10, 3, 3, 5, 1, 2, 1, 1, False),          # kernel wider than the image: all border
    (1, 64, 64, 20, 20, 3, 1, 1, 1, 1, False),        # several pixel blocks
    (2, 256, 36, 6, 6, 3, 2, 1, 1, 1, True),          # 4 words per tap
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the simulation's F.conv2d
@torch.no_grad()
def test_conv_equals_float_simulation(case, backends, monkeypatch):
    torch.manual_seed(CONV_CASES.index(case))
    n, c, o, h, w, k, stride, padding, dilation, groups, bias = case
    layer, bits, exp = frozen(nn.Conv2d(c, o, k, stride, padding, dilation, groups, bias=bias))
    twin = rt.BitwiseConv2d.from_binary(layer, bits, rt.scale_of(exp))
    x = signed_input(n, c, h, w)
    sim = layer(x)
    w64 = layer.weight.double()
    b64 = None if layer.bias is None else layer.bias.double()
    ref64 = F.conv2d(sign(x).double(), w64, b64, stride, padding, dilation, groups)
    outs = run_all(monkeypatch, backends, lambda: twin(x))
    scale = rt.scale_of(exp)
    for y in outs.values():
        assert y.shape == sim.shape and y.dtype == torch.float32
        check_exact(y, sim, ref64, layer.bias, scale, c // groups * k * k, 1)
    assert torch.equal(outs[backends[0]], outs["python"])


LINEAR_CASES = [(1, 4096, 256, False), (3, 100, 37, True), (8, 33, 5, True), (2, 1000, 300, False), (5, 64, 10, True)]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "-".join(map(str, c)))
@torch.no_grad()
def test_linear_equals_float_simulation(case, backends, monkeypatch):
    torch.manual_seed(sum(case))
    n, f, o, bias = case
    layer, bits, exp = frozen(nn.Linear(f, o, bias=bias))
    twin = rt.BitwiseLinear.from_binary(layer, bits, rt.scale_of(exp))
    x = signed_input(n, f)
    sim = layer(x)
    ref64 = F.linear(sign(x).double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    outs = run_all(monkeypatch, backends, lambda: twin(x))
    for y in outs.values():
        check_exact(y, sim, ref64, layer.bias, rt.scale_of(exp), f, 1)
    assert torch.equal(outs[backends[0]], outs["python"])


@torch.no_grad()
def test_unbatched_inputs_and_nan_follow_the_simulation(backends, monkeypatch):
    torch.manual_seed(1)
    conv, cbits, cexp = frozen(nn.Conv2d(20, 9, 3, padding=1, bias=False))
    fc, fbits, fexp = frozen(nn.Linear(70, 6, bias=False))
    x, v = signed_input(20, 5, 5), signed_input(2, 3, 70)
    x[0, 0, 0], v[0, 0, 0] = float("nan"), float("nan")  # sign(NaN) = -1 in the simulation
    tc, tf = (rt.BitwiseConv2d.from_binary(conv, cbits, rt.scale_of(cexp)),
              rt.BitwiseLinear.from_binary(fc, fbits, rt.scale_of(fexp)))
    for yc, yf in run_all(monkeypatch, backends, lambda: (tc(x), tf(v))).values():
        assert torch.equal(yc, conv(x)) and torch.equal(yf, fc(v))


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics, so the signs downstream are not all alike."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name, shortcut", [("resnet18", False), ("torchvision:resnet18", False),
                                            ("resnet18", True)])
@torch.no_grad()
def test_whole_model_is_bit_identical_to_load_packed(name, shortcut, backends, monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = irconvert.binarize(_randomize_bn(create_model(name, num_classes=10)), shortcut=shortcut)
    path = irconvert.save_packed(model, tmp_path / "packed.safetensors")
    sim, net = irconvert.load_packed(path), rt.load(path)
    assert set(net.irconvert_runtime.values()) == {"bitwise"}
    assert len(net.irconvert_runtime) == len(list(irconvert.binary_layers(model)))
    assert sum(isinstance(m, rt.BitwiseConv2d) for m in net.modules()) == len(net.irconvert_runtime)
    linked = [m.bireal_conv for m in net.modules() if getattr(m, "bireal_conv", None) is not None]
    assert bool(linked) == shortcut and all(isinstance(c, rt.BitwiseConv2d) for c in linked)
    x = torch.randn(2, 3, 64, 64)
    want = sim(x)
    outs = run_all(monkeypatch, backends, lambda: net(x))
    for y in outs.values():
        assert torch.equal(y, want)  # every binary conv of a ResNet is bias-free


class Mixed(nn.Module):
    """Layers the runtime must take over and layers it must leave to the float path."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 40, 3, padding=1)
        self.std = timm.layers.StdConv2d(40, 40, 3, padding=1)  # standardizes its weight in forward
        self.same = timm.layers.Conv2dSame(40, 40, 3, stride=2)  # pads in forward
        self.plain = nn.Conv2d(40, 72, 3, padding=1)
        self.dw = nn.Conv2d(72, 72, 3, padding=1, groups=72)
        self.fc1 = nn.Linear(72, 50)
        self.fc2 = nn.Linear(50, 30)
        self.head = nn.Linear(30, 5)

    def forward(self, x):
        x = self.dw(self.plain(self.same(self.std(self.stem(x)))))
        return self.head(self.fc2(self.fc1(x.mean((2, 3)))))


@torch.no_grad()
def test_only_plain_w1a1_layers_are_taken_over(backends, monkeypatch, tmp_path):
    torch.manual_seed(3)
    policy = irconvert.Policy(keep_depthwise=False, layers={"fc2": "W1A32"}, w1a1_min_fan_in=0)
    model = irconvert.binarize(Mixed(), policy, calibrate=False)  # random weights: fc1 would look dead
    path = irconvert.save_packed(model, tmp_path / "packed.safetensors")
    sim, net = irconvert.load_packed(path, model=Mixed()), rt.load(path, model=Mixed())
    report = net.irconvert_runtime
    assert {n for n, v in report.items() if v == "bitwise"} == {"plain", "dw", "fc1"}
    assert "StdConv2d is not a plain" in report["std"] and "Conv2dSame is not a plain" in report["same"]
    assert report["fc2"].startswith("W1A32")
    assert isinstance(net.plain, rt.BitwiseConv2d) and isinstance(net.fc1, rt.BitwiseLinear)
    assert type(net.std) is type(sim.std)
    x = torch.randn(2, 3, 12, 12)
    want = sim(x)
    for y in run_all(monkeypatch, backends, lambda: net(x)).values():
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5)  # plain and fc1 have a bias: ulps


def test_fallback_is_announced_once_and_native_can_be_required(monkeypatch):
    monkeypatch.setattr(kernels, "_build", lambda march: (None, "OSError: no C++ compiler"))
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    kernels._warn_fallback.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*PyTorch fallback") as caught:
            assert kernels.backend() == "python"
            assert kernels.backend() == "python"
        assert len(caught) == 1
        monkeypatch.setenv(kernels.ENV_BACKEND, "native")
        with pytest.raises(IRConvertError, match="IRCONVERT_RUNTIME=native: the bitwise kernel could not be built"):
            kernels.backend()
        monkeypatch.setenv(kernels.ENV_BACKEND, "gpu")
        with pytest.raises(IRConvertError, match="IRCONVERT_RUNTIME='gpu'"):
            kernels.backend()
    finally:
        kernels._warn_fallback.cache_clear()


def test_failed_build_is_caught(monkeypatch, tmp_path):
    monkeypatch.setenv("IRCONVERT_CACHE", str(tmp_path))
    ext, why = kernels._build("no-such-cpu")  # the compiler rejects -march at once
    assert ext is None and why


def test_the_kernel_cache_is_keyed_by_the_torch_install_not_only_its_version(monkeypatch):
    # issue 30: two environments with the same torch version shared one build folder, and ninja
    # rebuilt it (~17 s) each time the other one had used it, since the include paths differ
    from irconvert import native

    key = native.build_key(b"source", "native")
    assert native.build_key(b"source", "native") == key
    monkeypatch.setattr(torch, "__file__", "/another/env/site-packages/torch/__init__.py")
    assert native.build_key(b"source", "native") != key
    monkeypatch.undo()
    monkeypatch.setattr(torch.version, "git_version", "0" * 40)  # another build of the same version
    assert native.build_key(b"source", "native") != key


@pytest.mark.skipif(shutil.which("ninja") is None, reason="ninja decides what is up to date")
@pytest.mark.parametrize("stale", [True, False])
def test_every_build_is_announced_not_only_the_first(tmp_path, monkeypatch, capsys, stale):
    import torch.utils.cpp_extension as cpp
    from importlib import resources

    from irconvert import native

    monkeypatch.setenv("IRCONVERT_CACHE", str(tmp_path))
    code = (resources.files("irconvert") / "csrc" / "bitwise.cpp").read_bytes()
    name = f"irconvert_bitwise_{native.build_key(code, 'nocpu')}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.so").write_bytes(b"built before")
    (folder / "input.h").write_text("a header")
    (folder / "build.ninja").write_text("rule cp\n  command = cp $in $out\nbuild out.o: cp input.h\ndefault out.o\n")
    if not stale:  # built, as torch's loader builds: ninja keeps the command in its log
        subprocess.run(["ninja"], cwd=folder, check=True, capture_output=True)
    monkeypatch.setattr(cpp, "load", lambda **kwargs: "built")
    native.build.cache_clear()
    try:
        assert native.build("nocpu") == ("built", "")
    finally:
        native.build.cache_clear()
    err = capsys.readouterr().err
    assert ("rebuilding the bitwise kernel" in err) == stale, err


def test_a_build_lock_left_by_a_killed_build_does_not_hang_the_next(tmp_path, monkeypatch):
    # torch's loader waits while its build folder's `lock` file exists; a build killed mid-way (Ctrl-C,
    # a timeout) left one, and every later process hung there for good
    import torch.utils.cpp_extension as cpp
    from importlib import resources

    from irconvert import native

    monkeypatch.setenv("IRCONVERT_CACHE", str(tmp_path))
    code = (resources.files("irconvert") / "csrc" / "bitwise.cpp").read_bytes()
    folder = tmp_path / f"irconvert_bitwise_{native.build_key(code, 'nocpu')}"
    folder.mkdir()
    (folder / "lock").write_text("")  # what the killed build left

    def load(**kwargs):
        assert not (Path(kwargs["build_directory"]) / "lock").exists()  # torch's own wait would never end
        return "built"

    monkeypatch.setattr(cpp, "load", load)
    native.build.cache_clear()
    try:
        assert native.build("nocpu") == ("built", "")
    finally:
        native.build.cache_clear()


def test_functional_rejects_mismatched_words():
    words = torch.zeros(8, 3, 3, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="do not fit together"):
        rt.bitwise_conv2d(torch.randn(1, 65, 5, 5), words, torch.ones(8))
    with pytest.raises(ValueError, match="do not fit in_features"):
        rt.bitwise_linear(torch.randn(2, 10), torch.zeros(1, 1, 8, dtype=torch.int64), torch.ones(8), 65)


def test_repacked_words_hold_the_file_bits():
    torch.manual_seed(5)
    shape = (11, 70, 3, 3)
    signs = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    words = rt.conv_words(pack_signs(fan_in_order(signs)), shape)
    assert words.shape == (11, 3, 3, math.ceil(70 / 64))
    bit = (words[..., 1] >> 5) & 1  # channel 64 + 5 of every tap
    assert torch.equal(bit, (signs[:, 69] < 0).long())
    assert int((words[..., 1] >> 6).abs().sum()) == 0  # bits past the 70 channels are 0
