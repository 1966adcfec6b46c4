"""The embedded architecture (embed.py): a user-defined model saved with save_packed(..., embed=True)
reloads in a process that never saw its class, bit for bit; the .pt2 is read without unpickling."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import irconvert
from helpers import cli
from irconvert.embed import _plain_expression, arch_path
from irconvert.fused.sign import ENV as TRAIN_KERNELS
from irconvert.runtime.kernels import ENV_BACKEND

ROOT = Path(__file__).resolve().parents[1]


class SmallNet(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool-linear, defined here and registered nowhere."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _trained(**policy) -> nn.Module:
    """SmallNet binarized, its BatchNorm statistics and weights moved off their initial values."""
    torch.manual_seed(0)
    net = irconvert.binarize(SmallNet(), calibrate=torch.randn(8, 3, 16, 16), **policy)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3, 16, 16))
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def _train_sign_in_pytorch():
    """The fused training sign gives the same numbers; its compiled kernel is not what is tested here
    (and the subprocesses inherit this, so they do not load it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRAIN_KERNELS, "python")
        yield


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, the trained binary model, input, its outputs) with packed.safetensors embedding the architecture."""
    folder = tmp_path_factory.mktemp("embed")
    net = _trained(shortcut="gated")
    irconvert.save_packed(net, folder / "packed.safetensors", embed=torch.randn(2, 3, 16, 16))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, folder / "x.pt")
    with torch.no_grad():
        y = net(x)
    return folder, net, x, y


_CHILD = """
import sys, torch, irconvert
folder = sys.argv[1]
x = torch.load(folder + "/x.pt", weights_only=True)
packed, fast = irconvert.load_packed(folder + "/packed.safetensors"), irconvert.runtime.load(folder + "/packed.safetensors")
with torch.no_grad():
    torch.save({"packed": packed(x), "runtime": fast(x), "layers": dict(fast.irconvert_runtime)}, folder + "/y.pt")
"""


@pytest.fixture(scope="module")
def child(saved, backends):
    """The outputs of load_packed and runtime.load (its first backend) in a fresh interpreter that never
    defines SmallNet."""
    folder = saved[0]
    env = dict(os.environ, **{ENV_BACKEND: backends[0]})
    run = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return torch.load(folder / "y.pt", weights_only=True)


def test_files_beside_each_other_weight_free(saved):
    folder, net, _, _ = saved
    meta = irconvert.fileformat.read(folder / "packed.safetensors", "irconvert-packed/2")[1]
    entry = json.loads(meta["architecture"])
    assert entry["file"] == "packed.arch.pt2" == arch_path(folder / "packed.safetensors").name
    binary = {n for n, lp in net.irconvert_plan.layers.items() if lp.mode}
    assert binary and set(entry["modules"]) == binary | {norm for _, norm in net.irconvert_plan.shortcuts}
    assert json.loads(meta["input_size"]) == entry["input_size"] == [3, 16, 16]  # the example's (C, H, W)
    with zipfile.ZipFile(folder / entry["file"]) as z:
        weights = [i for i in z.infolist() if "/data/weights/weight_" in i.filename]
        assert weights and all(i.file_size == 0 for i in weights)  # the packed file holds every weight


@pytest.mark.slow  # a fresh interpreter imports torch and loads the bitwise kernel: ~10-70 s on 2 busy cores
def test_fresh_process_reproduces_the_trained_binary_model(saved, child):
    assert torch.equal(child["packed"], saved[3])


@pytest.mark.slow
def test_fresh_process_runtime_is_bit_identical(saved, child):
    assert torch.equal(child["runtime"], saved[3])
    assert "bitwise" in child["layers"].values()  # the bitwise kernels ran the W1A1 convs


def test_reloads_exactly_at_other_batch_sizes(saved, backends, monkeypatch):
    folder, net, _, _ = saved
    monkeypatch.setenv(ENV_BACKEND, backends[0])
    loaded, fast = irconvert.load_packed(folder / "packed.safetensors"), irconvert.runtime.load(folder / "packed.safetensors")
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            y = net(x)
            assert torch.equal(loaded(x), y) and torch.equal(fast(x), y)


def test_missing_architecture_file(saved, tmp_path):
    folder = saved[0]
    (tmp_path / "packed.safetensors").write_bytes((folder / "packed.safetensors").read_bytes())
    with pytest.raises(irconvert.IRConvertError, match=r"packed\.arch\.pt2: file not found.*model="):
        irconvert.load_packed(tmp_path / "packed.safetensors")


def test_corrupt_architecture_file_is_exit_2(saved, tmp_path, capsys):
    folder = saved[0]
    (tmp_path / "packed.safetensors").write_bytes((folder / "packed.safetensors").read_bytes())
    data = bytearray((folder / "packed.arch.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "packed.arch.pt2").write_bytes(bytes(data))
    with pytest.raises(irconvert.IRConvertError, match="does not match packed.safetensors"):
        irconvert.load_packed(tmp_path / "packed.safetensors")
    code, _, err = cli(capsys, "verify", tmp_path / "packed.safetensors")
    assert code == 2 and "does not match" in err


def test_verify_runs_on_the_embedded_architecture(saved, capsys):
    code, out, err = cli(capsys, "verify", saved[0] / "packed.safetensors")
    assert code == 0, err


def test_without_embedding_the_old_message_stays(tmp_path):
    net = _trained()
    with pytest.raises(irconvert.IRConvertError, match=r"no registered name.*model=MyNet\(\)"):
        irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors"))
    assert not (tmp_path / "p.arch.pt2").exists()


def test_a_users_file_in_the_way_is_not_overwritten(tmp_path):
    (tmp_path / "p.arch.pt2").write_text("mine")
    with pytest.raises(irconvert.IRConvertError, match="not an irconvert architecture file"):
        irconvert.save_packed(_trained(), tmp_path / "p.safetensors", embed=True)
    assert (tmp_path / "p.arch.pt2").read_text() == "mine"


@pytest.mark.parametrize("text, ok", [
    ("Symbol('s77', positive=True, integer=True)", True),
    ("2*s0 + FloorDiv(s1, 2)", True),
    ("__import__('os').system('true')", False),
    ("Symbol('s0').__class__", False),
    ("open('x')", False),
    ("Symbol('__class__')", False),
])
def test_shape_expressions_are_checked_before_sympy_sees_them(text, ok):
    assert _plain_expression(text) is ok


def _doctored(src: Path, dst: Path, member: str, change) -> Path:
    """Copy .pt2 archive `src` to `dst` with the JSON member ending in `member` changed by `change`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(member):
                doc = json.loads(data)
                change(doc)
                data = json.dumps(doc).encode()
            zout.writestr(info, data)
    return dst


def _pickled(doc):
    next(iter(doc["config"].values()))["use_pickle"] = True


def _eval_target(doc):
    doc["graph_module"]["graph"]["nodes"][0]["target"] = "builtins.eval"


def _guards(doc):
    doc["guards_code"] = ["__import__('os').system('true')"]


@pytest.mark.parametrize("member, change, message", [
    ("data/weights/model_weights_config.json", _pickled, "pickled weight"),
    ("models/model.json", _eval_target, "'builtins.eval', not an aten operator"),
    ("models/model.json", _guards, "guard code"),
])
def test_archives_that_would_run_code_are_refused(saved, tmp_path, member, change, message):
    from irconvert.embed import _read_program

    bad = _doctored(saved[0] / "packed.arch.pt2", tmp_path / "bad.arch.pt2", member, change)
    with pytest.raises(irconvert.IRConvertError, match=message):
        _read_program(bad)


def test_embedding_uses_the_size_the_model_was_calibrated_on(tmp_path):
    # issue 30: a model calibrated on 28x28 was exported at 224x224, so its reload refused 28x28
    # input, and summary counted MACs at 224
    torch.manual_seed(0)
    net = irconvert.binarize(SmallNet(), calibrate=torch.randn(8, 3, 28, 28)).eval()
    assert irconvert.summary(net).input_size == (3, 28, 28)
    back = irconvert.load_packed(irconvert.save_packed(net, tmp_path / "p.safetensors", embed=True))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=1e-5)


def test_embedding_without_a_known_input_size_is_refused(tmp_path):
    net = irconvert.binarize(SmallNet(), calibrate=False).eval()  # no batch seen, no pretrained_cfg
    with pytest.raises(irconvert.IRConvertError, match=r"input size of this SmallNet is unknown.*embed=example_batch"):
        irconvert.save_packed(net, tmp_path / "p.safetensors", embed=True)
    assert not (tmp_path / "p.arch.pt2").exists() and not (tmp_path / "p.safetensors").exists()
