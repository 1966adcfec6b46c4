"""A method from a user's module (tests/user_method.py), with no edit to irconvert: used from
Python and from a recipe, exported, and reloaded exactly (in this process and a fresh one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import irconvert
from irconvert.errors import IRConvertError
from irconvert.methods import METHODS, get_method, method_spec
from user_method import XNORMean

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Hardtanh(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_user_method_is_registered_and_named_by_its_module():
    assert isinstance(METHODS["xnor_mean"], XNORMean)
    assert get_method("user_method:XNORMean") is METHODS["xnor_mean"]
    assert method_spec(XNORMean()) == "user_method:XNORMean"
    assert irconvert.Policy(method=XNORMean()).method == "user_method:XNORMean"


def test_user_method_forward_is_its_equation():
    net = irconvert.binarize(tiny(), method=XNORMean(), keep_first=False, keep_last=False, keep_magnitude=False)
    layer = net[3]
    w = layer.latent_weight.detach()
    s = w.abs().mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)
    assert torch.equal(layer.weight.detach(), torch.where(w >= 0, 1.0, -1.0) * s)


def test_user_method_from_python_exports_and_reloads_exactly(tmp_path):
    net = irconvert.binarize(tiny(), method=XNORMean())
    irconvert.save_latent(net, tmp_path / "model.safetensors")
    irconvert.save_packed(net, tmp_path / "packed.safetensors")
    x = torch.randn(2, 3, 8, 8)
    again = irconvert.load_packed(tmp_path / "packed.safetensors", model=tiny())
    assert torch.equal(net.eval()(x), again(x))
    meta_policy = irconvert.load(tmp_path / "model.safetensors", model=tiny()).irconvert_plan.policy
    assert meta_policy.method == "user_method:XNORMean"


def test_a_method_instance_must_be_its_registered_form():
    odd = XNORMean()
    odd.extra = 1  # configured state that a file could not record
    with pytest.raises(ValueError, match="built with no arguments"):
        irconvert.Policy(method=odd)


def test_unknown_method_spec_is_one_clear_error():
    with pytest.raises(IRConvertError, match="cannot import 'no_such_module:X'"):
        get_method("no_such_module:X")


@pytest.mark.slow
def test_user_method_from_a_recipe_converts_and_verifies_in_fresh_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "irconvert", "resnet10t", "--convert-only", "--recipe",
           str(ROOT / "recipes" / "quickstart.yaml"), "--set", "binarize.method=user_method:XNORMean", "--out", str(out),
           "--set", "model.pretrained=false", "--set", "model.kwargs={}"]  # not the shipped ResNet-18's weights
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "user_method:XNORMean" and report["packed_max_abs_diff"] == 0.0
    res = subprocess.run([sys.executable, "-m", "irconvert", "verify", str(out / "packed.safetensors")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert res.returncode == 0 and "max |packed - latent| = 0 (ok" in res.stdout, res.stdout + res.stderr
