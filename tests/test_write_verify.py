"""Packed export: bit layout, exact reload, damaged files, batch conversion."""

import json
import math
import os
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import timm
import torch

import irconvert
from irconvert.errors import IRConvertError
from irconvert.models import create_model
from irconvert.pack import WORD_BITS, fan_in_order, from_fan_in_order, pack_signs, unpack_signs
from irconvert.verify import max_abs_diff


@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 63, 64, 65, 100, 577])
def test_pack_round_trip_and_word_count(n):
    g = torch.Generator().manual_seed(n)
    signs = torch.where(torch.randn(6, n, generator=g) >= 0, 1.0, -1.0)
    words = pack_signs(signs)
    assert words.dtype == torch.int32 and words.shape == (6, math.ceil(n / WORD_BITS))
    assert torch.equal(unpack_signs(words, n), signs)
    # unused bits of the last word are 0
    if n % 32:
        last = words[:, -1].to(torch.int64) & 0xFFFFFFFF
        assert torch.all(last >> (n % 32) == 0)


def test_bit_layout_is_lsb_first_and_one_means_minus_one():
    signs = torch.ones(1, 40)
    signs[0, 0] = -1  # bit 0 of word 0
    signs[0, 33] = -1  # bit 1 of word 1
    w = pack_signs(signs)
    assert w.tolist() == [[1, 2]]


def test_fan_in_order_is_ohwi():
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # O I H W
    rows = fan_in_order(w)
    assert rows[0, :3].tolist() == [w[0, 0, 0, 0], w[0, 1, 0, 0], w[0, 2, 0, 0]]  # channels innermost
    assert torch.equal(from_fan_in_order(rows, tuple(w.shape)), w)


def trained(name, x, **kw):
    torch.manual_seed(0)
    b = irconvert.binarize(create_model(name, num_classes=10, **kw))
    with torch.no_grad():  # move latent weights and BN statistics away from init, as training would
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
        b.train()(x)
    return b.eval()


def real_images(fashion_root, size, n=4):
    from irconvert.data import _read_idx

    x = _read_idx(fashion_root / "t10k-images-idx3-ubyte.gz")[:n].float().div(255).unsqueeze(1)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenetv3_small_100", 64),
                                        ("vit_tiny_patch16_224", 224), ("torchvision:resnet18", 64)])
@pytest.mark.slow
def test_exact_reload_random_and_real_inputs(tmp_path, fashion_root, name, size):
    x = torch.randn(4, 3, size, size)
    b = trained(name, x)
    irconvert.save_packed(b, tmp_path / "packed.safetensors")
    irconvert.save_latent(b, tmp_path / "model.safetensors")
    packed, latent = irconvert.load_packed(tmp_path / "packed.safetensors"), irconvert.load(tmp_path / "model.safetensors")
    real = real_images(fashion_root, size)
    for inp in (x, real):
        assert max_abs_diff(b, packed, inp) <= 1e-5
        assert max_abs_diff(b, latent, inp) <= 1e-5
    # the packed file stores ceil(fan_in/32) words per output channel, one exponent each
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "packed.safetensors"), "pt").metadata()["layers"])
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "packed.safetensors")
    for layer, info in meta.items():
        assert tensors[f"{layer}.weight.bits"].shape == (info["shape"][0], math.ceil(info["fan_in"] / 32))
        assert tensors[f"{layer}.weight.exp"].dtype == torch.int8


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pk")
    b = irconvert.binarize(timm.create_model("resnet18", num_classes=10)).eval()
    return irconvert.save_packed(b, d / "packed.safetensors")


def test_truncated_file_gives_clear_error(tmp_path, packed_file):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(packed_file.read_bytes()[: packed_file.stat().st_size // 2])
    with pytest.raises(IRConvertError, match=r"cut.safetensors: not a readable safetensors file, truncated or corrupted"):
        irconvert.load_packed(cut)


def test_edited_tensor_bytes_fail_the_checksum(tmp_path, packed_file):
    data = bytearray(packed_file.read_bytes())
    data[-100] ^= 0xFF
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(IRConvertError, match="edited.safetensors: contents do not match their checksum"):
        irconvert.load_packed(bad)


def rewrite_metadata(src, dst, **changes):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["__metadata__"].update(changes)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    dst.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def test_other_format_version_and_wrong_kind_are_named(tmp_path, packed_file):
    future = tmp_path / "future.safetensors"
    rewrite_metadata(packed_file, future, format="irconvert-packed/9", irconvert_version="9.0")
    with pytest.raises(IRConvertError, match=r"format irconvert-packed/9 was written by irconvert 9.0; .* reads irconvert-packed/2"):
        irconvert.load_packed(future)
    with pytest.raises(IRConvertError, match="is a irconvert-packed file, expected irconvert-latent"):
        irconvert.load(packed_file)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(IRConvertError, match="not an irconvert file"):
        irconvert.load_packed(tmp_path / "plain.safetensors")


def test_a_policy_field_from_a_newer_irconvert_is_named_with_the_version_that_wrote_it(tmp_path, packed_file):
    policy = json.loads(irconvert.load_packed(packed_file, model=timm.create_model("resnet18", num_classes=10))
                        .irconvert_plan.policy.model_dump_json())
    newer = tmp_path / "newer.safetensors"
    rewrite_metadata(packed_file, newer, policy=json.dumps(policy | {"future_knob": 1}), irconvert_version="0.9.0")
    with pytest.raises(IRConvertError, match=r"newer.safetensors: its policy has fields this irconvert \S+ does not "
                                             r"know \(future_knob\): it was written by irconvert 0.9.0; read it with"):
        irconvert.load_packed(newer, model=timm.create_model("resnet18", num_classes=10))
    bad = tmp_path / "bad.safetensors"
    rewrite_metadata(packed_file, bad, policy=json.dumps(policy | {"rsign": "maybe"}))
    with pytest.raises(IRConvertError, match=r"bad.safetensors: metadata 'policy' is invalid \(.*\); export it again"):
        irconvert.load_packed(bad, model=timm.create_model("resnet18", num_classes=10))


def test_format_1_files_still_load(tmp_path, packed_file):
    old = tmp_path / "v1.safetensors"  # /1 had no thresholds or float scales: an IR-Net file is the same bytes
    rewrite_metadata(packed_file, old, format="irconvert-packed/1")
    x = torch.randn(2, 3, 32, 32)
    arch = lambda: timm.create_model("resnet18", num_classes=10)  # noqa: E731
    a, b = irconvert.load_packed(packed_file, model=arch()), irconvert.load_packed(old, model=arch())
    assert max_abs_diff(a, b, x) == 0.0


@pytest.mark.slow
def test_batch_reports_a_failure_and_converts_the_others(tmp_path):
    # A name the batch's check accepts, whose build fails inside its own process (as a download, an
    # out-of-memory or a model's own bug would): timm learns "brokennet_v9" from a sitecustomize that every
    # process of the batch imports, and building it raises.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "from timm.models import register_model\n\n"
        "@register_model\n"
        "def brokennet_v9(pretrained=False, **kwargs):\n"
        "    raise RuntimeError('brokennet_v9 cannot be built')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    models = tmp_path / "models.yaml"
    models.write_text("- resnet18\n- name: brokennet_v9\n- name: torchvision:mobilenet_v3_small\n  set: []\n")
    out = tmp_path / "batch"
    res = subprocess.run([sys.executable, "-m", "irconvert", "--models", str(models), "--convert-only", "--out", str(out)],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 1 and "failed: brokennet_v9" in res.stderr, res.stderr
    report = json.loads((out / "batch.json").read_text())
    assert [(r["model"], r["status"]) for r in report] == [
        ("resnet18", "ok"), ("brokennet_v9", "fail"), ("torchvision:mobilenet_v3_small", "ok")]
    assert "brokennet_v9 cannot be built" in report[1]["error"]
    assert report[0]["packed_max_abs_diff"] == 0.0 and report[2]["packed_max_abs_diff"] == 0.0
    suite = ET.parse(out / "junit.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert [c.get("name") for c in suite if c.find("failure") is not None] == ["brokennet_v9"]
    assert not (out / "brokennet_v9").exists()


def test_load_gives_a_model_that_trains_as_the_converted_one(tmp_path):
    """`load` fuses the Hardtanh modules that only W1A1 layers read, as `binarize` did: the same fused set,
    the same outputs and the same gradients (it used to train with every Hardtanh unfused)."""
    torch.manual_seed(0)
    net = irconvert.binarize(timm.create_model("resnet18", num_classes=10))
    assert net.irconvert_plan.fused
    loaded = irconvert.load(irconvert.save_latent(net, tmp_path / "model.safetensors"))
    assert loaded.irconvert_plan.fused == net.irconvert_plan.fused
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for m in (net, loaded):
        m.train()
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)
