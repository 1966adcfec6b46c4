"""Recipe validation, and real end-to-end runs of the CLI on Fashion-MNIST."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from irconvert.errors import IRConvertError
from irconvert.recipe import load_recipe

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
# a few steps on a small real subset: the whole pipeline in seconds
QUICK = ["data.subset=256", "data.val_subset=128", "data.batch_size=32", "teacher.finetune.epochs=1",
         "teacher.finetune.max_steps_per_epoch=2", "train.epochs=2", "train.max_steps_per_epoch=3"]


def run_cli(*args, cwd=None):
    cmd = [sys.executable, "-m", "irconvert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**__import__("os").environ, "TQDM_DISABLE": "1"})


def sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(recipe):
    r = load_recipe(RECIPES / recipe)
    assert r.binarize.keep_first and r.binarize.keep_last and r.train.ede.t_max == 10.0


@pytest.mark.parametrize("text, where", [
    ("model: {name: resnet18}\ndata: {dataset: fashion-mnist}\nbinarize: {keep_frist: true}\n", "binarize.keep_frist: unknown key"),
    ("model: {name: resnet18}\ndata: {dataset: fashion-mnist}\ntrain: {lr: fast}\n", "train.lr: Input should be a valid number"),
    ("data: {dataset: fashion-mnist}\n", "model: required field is missing"),
    ("model: {name: resnet18}\ndata: {dataset: svhn}\n", "data.dataset: Input should be 'fashion-mnist'"),
    ("model: {name: resnet18}\ndata: {dataset: mnist}\ntrain: {ede: {t_min: 1.0, t_max: 0.1}}\n", "train.ede: Value error, t_max (0.1) must not be below t_min"),
    ("model: {name: resnet18}\ndata: {dataset: mnist}\nbinarize: {method: xnor}\n", "binarize.method: Value error, unknown method 'xnor'"),
    ("model: [1, 2\n", "is not valid YAML"),
])
def test_schema_errors_name_the_field(tmp_path, text, where):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(IRConvertError) as err:
        load_recipe(path)
    assert where in str(err.value) and str(path) in str(err.value)


def test_extends_and_set_overrides(tmp_path):
    (tmp_path / "child.yaml").write_text(f"extends: {RECIPES / 'fashion-mnist.yaml'}\ntrain: {{epochs: 9}}\n")
    r = load_recipe(tmp_path / "child.yaml", ["train.lr=0.5", "binarize.mode=W1A32", "data.subset=100"])
    assert r.train.epochs == 9 and r.train.lr == 0.5 and r.binarize.mode == "W1A32" and r.data.subset == 100
    assert r.train.distill.temperature == 1.0  # inherited
    with pytest.raises(IRConvertError, match="expected key.path=value"):
        load_recipe(tmp_path / "child.yaml", ["train.lr"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, fashion_root):
    out = tmp_path_factory.mktemp("run") / "r"
    res = run_cli("resnet18", "--recipe", RECIPES / "quickstart.yaml", "--out", out, *sets(QUICK))
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res


@pytest.mark.slow
def test_end_to_end_cli_run_writes_everything(quick_run):
    out, res = quick_run
    for f in ("recipe.yaml", "metrics.jsonl", "report.json", "curves.png",
              "model.safetensors", "packed.safetensors"):
        assert (out / f).is_file(), f
    assert not (out / "checkpoint.pt").exists()  # output.keep_checkpoint is false: removed after the export
    report = json.loads((out / "report.json").read_text())
    assert report["packed_max_abs_diff"] <= 1e-5
    # the quickstart's 16-32-64-128 network: its 16 3x3 convs (the recipe keeps the downsamples FP)
    assert 0 <= report["binary"]["top1"] <= 100 and report["binary_layers"] == 16
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("teacher", 1), ("binary", 1), ("binary", 2)]
    assert rows[-1]["ede_t"] == pytest.approx(10.0)  # EDE reaches t_max on the last step
    assert "subset: 256" in (out / "recipe.yaml").read_text()  # --set is in the resolved recipe
    assert "binary (W1A1)" in res.stdout
    assert "binary epoch 2/2 step 3/3: loss" in res.stderr  # no terminal: progress lines instead of a bar, on stderr


@pytest.mark.slow
def test_existing_run_is_refused_and_left_untouched(quick_run):
    out, _ = quick_run
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = run_cli("resnet18", "--recipe", RECIPES / "quickstart.yaml", "--out", out, *sets(QUICK))
    assert res.returncode == 2 and "holds a finished run" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "--resume" not in res.stderr  # issue 30: a finished run has nothing to continue
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --resume of it (its checkpoint removed by the export) used to train again from scratch and
    # rewrite every file
    res = run_cli("resnet18", "--recipe", RECIPES / "quickstart.yaml", "--out", out, *sets(QUICK), "--resume")
    assert res.returncode == 0 and "the run is finished" in res.stdout and "nothing changed" in res.stdout, res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.slow
def test_resume_ends_with_the_same_weights(tmp_path, fashion_root, monkeypatch):
    from irconvert.run import run
    from irconvert.runfolder import RunFolder

    args = dict(overrides=tuple(QUICK), log=lambda *a: None)
    full = tmp_path / "full"
    run("resnet18", RECIPES / "quickstart.yaml", out=full, **args)

    real = RunFolder.write_metrics

    def crash_after_first_binary_epoch(folder):
        real(folder)
        if folder.stages[-1].name == "binary" and len(folder.stages[-1].history) == 1:
            raise KeyboardInterrupt  # the process dies right after the checkpoint of binary epoch 1

    part = tmp_path / "part"
    monkeypatch.setattr(RunFolder, "write_metrics", crash_after_first_binary_epoch)
    with pytest.raises(KeyboardInterrupt):
        run("resnet18", RECIPES / "quickstart.yaml", out=part, **args)
    monkeypatch.setattr(RunFolder, "write_metrics", real)
    assert not (part / "model.safetensors").exists()
    run("resnet18", RECIPES / "quickstart.yaml", out=part, resume=True, **args)
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["resnt18"], "unknown timm model 'resnt18'; did you mean resnet18"),
    (["torchvision:resnet17"], "unknown torchvision classifier 'resnet17'"),
    (["resnet18", "--set", "data.root=/nonexistent", "--set", "data.download=false"], "data.root: /nonexistent has no fashion-mnist files"),
    (["resnet18", "--weights", "/nonexistent.safetensors"], "weights file not found"),
    (["resnet18", "--set", "train.epochs=zero"], "train.epochs: Input should be a valid integer"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code, _, err = cli(capsys, *args, "--recipe", RECIPES / "quickstart.yaml", "--out", out)  # in-process: fast
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_that_do_not_fit_name_the_keys(tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    wrong = {k: v for k, v in timm.create_model("resnet34").state_dict().items()}
    save_file(wrong, tmp_path / "w.safetensors")
    code, _, err = cli(capsys, "torchvision:resnet18", "--weights", tmp_path / "w.safetensors", "--recipe",
                       RECIPES / "fashion-mnist.yaml", "--out", tmp_path / "o")
    assert code == 2 and "weights do not fit the model" in err and "unexpected: layer1.2" in err


@pytest.mark.slow
def test_imagenet_recipe_runs_on_a_tiny_image_folder(tmp_path, fashion_root):
    from PIL import Image

    from irconvert.data import _read_idx

    images = _read_idx(fashion_root / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(fashion_root / "t10k-labels-idx1-ubyte.gz")
    for split, start in (("train", 0), ("val", 500)):
        for i in range(start, start + 24):
            folder = tmp_path / "imagenet" / split / f"class{int(labels[i]) % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].numpy()).convert("RGB").resize((72, 72)).save(folder / f"{i}.png")
    res = run_cli("resnet34", "--recipe", RECIPES / "imagenet.yaml", "--out", tmp_path / "run",
                  *sets([f"data.root={tmp_path / 'imagenet'}", "model.pretrained=false", "data.image_size=64",
                         "data.batch_size=8", "data.workers=0", "train.epochs=1", "train.max_steps_per_epoch=2",
                         "train.warmup_epochs=0", "train.amp=off"]))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["model"] == "resnet34" and report["packed_max_abs_diff"] <= 1e-5


@pytest.mark.slow
def test_export_from_run_folder_rebuilds_the_same_files(quick_run, tmp_path):
    out, _ = quick_run
    res = run_cli("export", out)  # a finished run's files are what export writes: nothing to replace
    assert res.returncode == 0 and "packed.safetensors is up to date" in res.stdout, res.stderr
    before = load_file(out / "packed.safetensors")
    res = run_cli("export", out, "--overwrite")
    assert res.returncode == 0, res.stderr
    after = load_file(out / "packed.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    res = run_cli("verify", out / "packed.safetensors")
    assert res.returncode == 0 and "(1, 28, 28)" in res.stdout and "(ok" in res.stdout
