"""The shipped pretrained Fashion-MNIST model (bench/pretrain.py) and the quickstart recipe that converts it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irconvert.run import build_model
from irconvert.data import build_data
from irconvert.recipe import load_recipe
from irconvert.train import evaluate

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "irconvert" / "pretrained" / "fashion-mnist-resnet18-w16.safetensors"


def test_weights_path_in_a_recipe_is_relative_to_that_recipe(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.yaml").write_text("model: {name: resnet18, pretrained: w/x.safetensors}\n"
                                                "data: {dataset: mnist}\n")
    (tmp_path / "child.yaml").write_text("extends: sub/base.yaml\n")
    assert load_recipe(tmp_path / "child.yaml").model.pretrained == str(tmp_path.resolve() / "sub" / "w" / "x.safetensors")
    # a --set value is the user's own path (relative to the working directory), and true stays the hub
    assert load_recipe(tmp_path / "child.yaml", ["model.pretrained=y.pth"]).model.pretrained == str(Path("y.pth").resolve())
    assert load_recipe(tmp_path / "child.yaml", ["model.pretrained=true"]).model.pretrained is True


def test_a_saved_recipe_is_the_same_recipe_from_any_folder(tmp_path, monkeypatch):
    # issue 30: recipe.yaml stored the weights path relative to the working folder, and reading it back
    # made it relative to the run folder: another hash (so --resume refused) and "weights file not found"
    monkeypatch.chdir(ROOT)
    given = load_recipe("recipes/quickstart.yaml", ["data.root=data"])
    saved = tmp_path / "runs" / "q" / "recipe.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(given.to_yaml())
    monkeypatch.chdir(tmp_path)
    again = load_recipe(saved)
    assert again.digest() == given.digest() and Path(again.model.pretrained) == WEIGHTS
    assert again.data.root == str(ROOT / "data")  # data.root stays the folder it named where the run started
    # the hash does not depend on how a path was spelled
    spelled = load_recipe(saved, [f"model.pretrained={ROOT}/recipes/../pretrained/./{WEIGHTS.name}",
                                  f"data.root={ROOT}/bench/../data"])
    assert spelled.digest() == given.digest()


def test_set_on_a_null_section_creates_it():
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["teacher.finetune.epochs=2"])
    assert r.teacher.finetune.epochs == 2 and r.teacher.finetune.lr == 1e-3  # the Schedule defaults
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml").teacher.finetune is None


@pytest.mark.slow  # about 6 s: the validation set
def test_quickstart_converts_the_shipped_model_and_it_scores_what_its_record_says(fashion_root):
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["data.val_subset=null"])
    assert Path(recipe.model.pretrained).resolve() == WEIGHTS and recipe.teacher.finetune is None
    assert meta["test_top1"] >= 90.0 and meta["converged"] and WEIGHTS.stat().st_size < 5 * 2**20
    data = build_data(recipe.data)
    model = build_model(recipe, data.info)
    stored = load_file(str(WEIGHTS))
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    _, val = data.loaders(recipe.data, torch.Generator())
    assert evaluate(model, val, torch.device("cpu"))["top1"] == pytest.approx(meta["test_top1"], abs=0.05)


def test_pretrained_is_the_quickstart_recipes_model_offline(monkeypatch):
    import irconvert
    from irconvert.data import DataInfo
    from irconvert.errors import IRConvertError

    import socket

    def no_network(*a, **k):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)  # it must not need the hub
    assert irconvert.list_pretrained() == ["fashion-mnist-resnet18-w16"]
    model = irconvert.pretrained()
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    built = build_model(recipe, DataInfo(num_classes=10, in_chans=1, image_size=28))
    # the same architecture record (so its packed file rebuilds the same way) and the same weights
    assert model.irconvert_origin == built.irconvert_origin
    stored = load_file(str(WEIGHTS))
    assert model.state_dict().keys() == stored.keys()
    assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), built.eval()(x))
    with pytest.raises(IRConvertError, match="did you mean fashion-mnist-resnet18-w16"):
        irconvert.pretrained("fashion-mnist-resnet18")
