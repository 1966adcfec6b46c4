"""Every command on the project's own outputs: a small quickstart run (the README's first command,
reduced with --set), then summary, export, verify, eval and bench-runtime on what it wrote, and the
usage mistakes a first hour brings (issue 16)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from irconvert.errors import IRConvertError

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
TINY = ["model.pretrained=false", "model.kwargs.channels=[8,16,32,64]", "data.subset=64", "data.val_subset=32", "data.batch_size=16",
        "teacher.finetune.epochs=1", "teacher.finetune.max_steps_per_epoch=1", "train.epochs=1",
        "train.max_steps_per_epoch=2"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_root):
    """The README's first command, reduced: a finished run that keeps its checkpoint."""
    from irconvert.run import run

    out = tmp_path_factory.mktemp("cmd") / "quickstart"
    run("resnet18", QUICKSTART, out=out, overrides=tuple(TINY + ["output.keep_checkpoint=true"]), log=lambda *a: None)
    return out


@pytest.fixture()
def python_kernels(monkeypatch):
    monkeypatch.setenv("IRCONVERT_RUNTIME", "python")  # no compile in tests; same arithmetic


# -- 1. bench-runtime -------------------------------------------------------------------------------

def test_bench_runtime_uses_the_stored_input_size_and_prints_layer_rows(run_dir, capsys, python_kernels):
    code, out, err = cli(capsys, "bench-runtime", run_dir / "packed.safetensors", "--batch", "1", "--repeat", "1")
    assert code == 0, err
    assert "input (1, 28, 28)" in out
    assert "| model packed.safetensors | 1 |" in out
    layers = re.findall(r"^\|\s+(layer\d\.\d\.\w+(?:\.\d)?) \| 1 \|", out, re.M)
    assert "layer1.0.conv1" in layers and "layer4.1.conv2" in layers and len(layers) == 16  # the 3x3 convs (the recipe keeps the downsamples FP)


def test_first_kernel_build_is_announced_and_cuda_noise_silenced(tmp_path, monkeypatch, capsys):
    import logging

    import torch.utils.cpp_extension as cpp

    from irconvert.runtime import kernels

    def no_compiler(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv("IRCONVERT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpp, "load", no_compiler)
    kernels._build.cache_clear()
    try:
        ext, why = kernels._build("native")
    finally:
        kernels._build.cache_clear()  # the next caller builds (or finds) the real kernel
    assert ext is None and "no compiler here" in why
    assert "building the bitwise kernel (once per torch install and CPU, ~1-2 min)" in capsys.readouterr().err
    assert logging.getLogger("torch.utils.cpp_extension").level == logging.ERROR


# -- 2. summary ----------------------------------------------------------------------------------------

def test_summary_with_grey_input_size(capsys):
    code, out, err = cli(capsys, "summary", "resnet18", "--input-size", "1,28,28")
    assert code == 0, err
    assert "MACs at input (1, 28, 28)" in out
    assert re.search(r"^conv1 +Conv2d +fp32 +3,136 ", out, re.M)  # 64 x 1 x 7 x 7: one input channel


def test_summary_with_the_recipe_builds_the_quickstart_model(capsys, fashion_root):
    code, out, err = cli(capsys, "summary", "resnet18", "--recipe", QUICKSTART)
    assert code == 0, err
    assert "MACs at input (1, 28, 28)" in out
    assert re.search(r"^fc +Linear +fp32 +1,290 ", out, re.M)  # 128 x 10 + 10: the shipped model's width, the data's classes
    # stride-2 stem without max-pool: conv1's 64 x 14 x 14 outputs times 49 taps
    assert re.search(r"^conv1 +Conv2d +fp32 +3,136 .* 614,656$", out, re.M)


# -- 3, 4. export --------------------------------------------------------------------------------------

def test_export_of_a_finished_run_is_idempotent(run_dir, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    code, out, err = cli(capsys, "export", run_dir)
    assert code == 0, err
    assert out.count("is up to date") == 2
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert not list(run_dir.glob(".*tmp"))


def test_export_refuses_to_replace_a_different_file_without_overwrite(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "packed.safetensors").write_bytes(b"something else")
    code, _, err = cli(capsys, "export", run)
    assert code == 2 and "other contents" in err and len(err.strip().splitlines()) == 1
    assert (run / "packed.safetensors").read_bytes() == b"something else"
    code, _, err = cli(capsys, "export", run, "--overwrite")
    assert code == 0, err
    assert meta(run / "packed.safetensors") == meta(run_dir / "packed.safetensors")


def test_export_to_another_folder_and_of_a_run_without_checkpoint(run_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "export", run_dir, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    for name in ("model.safetensors", "packed.safetensors"):
        assert meta(tmp_path / "elsewhere" / name) == meta(run_dir / name)
    run = tmp_path / "done"
    shutil.copytree(run_dir, run)
    (run / "checkpoint.pt").unlink()  # output.keep_checkpoint: false removes it after the export
    (run / "packed.safetensors").unlink()
    code, out, err = cli(capsys, "export", run)
    assert code == 0, err
    assert meta(run / "packed.safetensors") == meta(run_dir / "packed.safetensors")


def test_export_of_a_checkpoint_outside_its_run_folder(run_dir, tmp_path, capsys):
    alone = tmp_path / "alone" / "checkpoint.pt"
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", alone)  # the checkpoint holds its resolved recipe
    code, _, err = cli(capsys, "export", alone)
    assert code == 0, err
    assert meta(alone.parent / "packed.safetensors") == meta(run_dir / "packed.safetensors")

    old = tmp_path / "old" / "checkpoint.pt"  # a checkpoint written before checkpoints held the recipe
    old.parent.mkdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del state["recipe"], state["binarization"]
    torch.save(state, old)
    code, _, err = cli(capsys, "export", old)
    assert code == 2 and "--recipe" in err and not (old.parent / "packed.safetensors").exists()
    code, _, err = cli(capsys, "export", old, "--recipe", QUICKSTART)  # not the run's: no --set values
    assert code == 2 and "is not the recipe of" in err
    code, _, err = cli(capsys, "export", old, "--recipe", run_dir / "recipe.yaml")
    assert code == 0, err
    assert meta(old.parent / "model.safetensors") == meta(run_dir / "model.safetensors")


def test_export_of_a_checkpoint_needs_no_data_and_gives_the_run_files(run_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint holds the plan it trained with: export rebuilds the model from it, without reading the
    dataset for a second calibration."""
    import irconvert.runfolder

    def no_data(*args, **kwargs):
        raise AssertionError("export read the dataset")

    monkeypatch.setattr(irconvert.runfolder, "build_data", no_data)
    alone = tmp_path / "alone" / "checkpoint.pt"
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", alone)
    code, _, err = cli(capsys, "export", alone)
    assert code == 0, err
    for name in ("model.safetensors", "packed.safetensors"):
        assert meta(alone.parent / name) == meta(run_dir / name)
        new, old = load_file(alone.parent / name), load_file(run_dir / name)
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)


def test_export_of_a_latent_file_keeps_input_size_and_recipe_hash(run_dir, tmp_path, capsys):
    code, _, err = cli(capsys, "export", run_dir / "model.safetensors", "--out", tmp_path)
    assert code == 0, err
    new, source = meta(tmp_path / "packed.safetensors"), meta(run_dir / "model.safetensors")
    assert json.loads(new["input_size"]) == [1, 28, 28] and new["input_size"] == source["input_size"]
    assert new["recipe_hash"] == source["recipe_hash"] != ""
    code, out, err = cli(capsys, "verify", tmp_path / "packed.safetensors", "--latent", run_dir / "model.safetensors")
    assert code == 0, err
    assert "MACs at input (1, 28, 28)" in out and "(ok, tolerance" in out


# -- 5. verify -------------------------------------------------------------------------------------------

def test_verify_with_a_missing_latent_file_is_an_error(run_dir, tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    code, out, err = cli(capsys, "verify", run_dir / "packed.safetensors", "--latent", missing)
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1 and out == ""


# -- 6. --set with a space -------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [["--set", "train.epochs", "2"], ["--set=train.epochs", "2"]])
def test_set_with_a_space_is_refused_before_anything_is_written(tmp_path, capsys, args):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "resnet18", "--recipe", QUICKSTART, "--out", out, *args)
    assert code == 2 and "did you mean --set train.epochs=2?" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_batch_never_writes_its_reports_into_a_run_folder(run_dir, capsys):
    before = sorted(p.name for p in run_dir.iterdir())
    code, _, err = cli(capsys, "resnet18", "resnet34", "--convert-only", "--out", run_dir)
    assert code == 2 and "holds a single run" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


# -- 7. --convert-only with a recipe ----------------------------------------------------------------------

def test_convert_only_builds_the_model_the_recipe_describes(tmp_path, capsys):
    out = tmp_path / "check"
    code, _, err = cli(capsys, "resnet18", "--convert-only", "--recipe", QUICKSTART, "--out", out,
                       "--set", "model.pretrained=false", "--set", "model.kwargs.channels=[8,16,32,64]")
    assert code == 0, err
    m = meta(out / "packed.safetensors")
    origin = json.loads(m["model"])
    assert origin["kwargs"] == {"channels": [8, 16, 32, 64], "num_classes": 10, "in_chans": 1}
    assert origin["adapt"] == {"first_stride": 2, "stem_pool": False}
    assert json.loads(m["input_size"]) == [1, 28, 28] and m["recipe_hash"]
    report = json.loads((out / "report.json").read_text())
    assert report["packed_max_abs_diff"] <= 1e-5 and report["size"]["input_size"] == [1, 28, 28]


def test_convert_only_with_a_local_pretrained_path(tmp_path, capsys):
    from irconvert.models import create_model
    from safetensors.torch import save_file

    src = create_model("resnet18", num_classes=10, in_chans=1, channels=[8, 16, 32, 64])
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "check"
    code, _, err = cli(capsys, "resnet18", "--convert-only", "--recipe", QUICKSTART, "--out", out,
                       "--set", "model.kwargs.channels=[8,16,32,64]", "--set", f"model.pretrained={tmp_path / 'w.safetensors'}")
    assert code == 0, err
    latent = safe_open(str(out / "model.safetensors"), framework="pt")
    assert torch.equal(latent.get_tensor("fc.weight"), src.state_dict()["fc.weight"])  # the file's weights


# -- 8. friction -------------------------------------------------------------------------------------------

def test_runtime_model_refuses_training(run_dir, python_kernels):
    import irconvert.runtime

    net = irconvert.runtime.load(run_dir / "packed.safetensors")
    with pytest.raises(IRConvertError, match="inference only"):
        net.train()
    assert not any(m.training for m in net.modules())  # refused before any module changed mode
    net.eval()
    y = net(torch.randn(2, 1, 28, 28))
    with pytest.raises(IRConvertError, match="inference only"):
        y.sum().backward()
    with torch.no_grad():  # inference is unchanged: the same values as the float simulation
        ref = irconvert.load_packed(run_dir / "packed.safetensors")
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(net(x), ref(x), rtol=0, atol=1e-5)


def test_output_files_respect_the_umask(tmp_path):
    from irconvert.fileformat import write_text

    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600


def test_run_files_have_the_umask_mode(run_dir):
    mask = os.umask(0)
    os.umask(mask)
    for p in run_dir.iterdir():
        if p.is_file():
            assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


def test_tensorboard_without_the_package_is_refused_before_writing(tmp_path, capsys, fashion_root):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    out = tmp_path / "run"
    code, _, err = cli(capsys, "resnet18", "--recipe", QUICKSTART, "--out", out, *sets(TINY + ["output.tensorboard=true"]))
    assert code == 2 and "pip install tensorboard" in err and not out.exists()


def test_curves_have_a_title_integer_epochs_own_axes_for_kd_and_the_fp_line(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from irconvert.runfolder import plot_curves
    from irconvert.train import Stage

    def rows(n, base):
        return [{"epoch": e, "train_loss": base / e, "val_loss": base / (e + 1), "val_top1": 60 + e} for e in range(1, n + 1)]

    stages = [Stage("teacher", None, None, 0, history=rows(1, 1.0)), Stage("binary", None, None, 0, history=rows(3, 5.0))]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    plot_curves(tmp_path / "c.png", stages, "resnet18: irnet W1A1", fp_top1=91.5, kd=True)
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    fig = figs[0]
    ce, train, acc, _ = fig.axes
    assert fig._suptitle.get_text() == "resnet18: irnet W1A1"
    assert [ln.get_label() for ln in ce.lines if not ln.get_label().startswith("_")] == [
        "teacher train", "teacher validation", "binary validation"]  # the KD loss is not a cross-entropy
    assert list(train.lines[0].get_xdata()) == [2, 3, 4] and train.lines[0].get_ydata()[0] == 5.0
    assert any(ln.get_label() == "FP model 91.50%" and list(ln.get_ydata()) == [91.5, 91.5] for ln in acc.lines)
    for ax in (ce, train, acc):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_curves_plot_log_points_the_flip_rate_the_loss_as_trained_and_integer_ticks_for_one_epoch(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from irconvert.plan import Policy
    from irconvert.plan import method_label
    from irconvert.runfolder import plot_curves
    from irconvert.train import Stage

    def row(stage_steps, flips):
        log = [{"step": s, "train_loss": 1.0 / s, **({"flip_rate": 0.01 * s} if flips else {})} for s in stage_steps]
        return {"epoch": 1, "train_loss": 0.5, "val_loss": 0.6, "val_top1": 70.0, "log": log}

    stages = [Stage("teacher", None, None, 0, history=[row(range(1, 5), False)]),
              Stage("binary", None, None, 0, history=[row(range(1, 5), True)])]
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)
    plot_curves(tmp_path / "c.png", stages, "t", kd=True, alpha=1.0)
    ce, train, acc, flips = figs[0].axes
    assert list(train.lines[0].get_xdata()) == [1.25, 1.5, 1.75, 2.0]  # four log points of the second epoch
    assert list(ce.lines[0].get_xdata()) == [0.25, 0.5, 0.75, 1.0]  # the teacher's, per log point too
    assert list(flips.lines[-1].get_ydata()) == pytest.approx([1, 2, 3, 4])  # in percent (lines[0]: the stage line)
    assert train.get_title() == "binary training loss (KD)"  # alpha 1: no label term
    for ax in (ce, train, acc, flips):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [0, 1, 2], ticks
    plot_curves(tmp_path / "c.png", stages[1:], "t", kd=True, alpha=0.9)
    _, train, *_ = figs[1].axes
    assert train.get_title() == "binary training loss (KD + CE)"
    ticks = [t for t in train.get_xticks() if train.get_xlim()[0] <= t <= train.get_xlim()[1]]
    assert ticks == [0, 1]  # one epoch: 0 and 1, no fractional or outlying ticks
    assert method_label(Policy(rsign=True, activation="rprelu")) == "irnet + RSign + RPReLU"
    assert method_label(Policy()) == "irnet"  # auto, with no plan that placed a shortcut
    assert method_label(Policy(shortcut="gated")) == "irnet + Bi-Real shortcut (gated)"


@pytest.mark.slow
def test_tensorboard_writes_event_files(tmp_path, fashion_root):
    pytest.importorskip("torch.utils.tensorboard")  # the optional extra: irconvert[tensorboard]
    from irconvert.run import run

    out = tmp_path / "tb"
    run("resnet18", QUICKSTART, out=out, overrides=tuple(TINY + ["output.tensorboard=true"]), log=lambda *a: None)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


# -- 9. eval -------------------------------------------------------------------------------------------------

def test_eval_of_a_run_its_files_and_through_the_kernels(run_dir, capsys, python_kernels):
    report = json.loads((run_dir / "report.json").read_text())
    code, out, err = cli(capsys, "eval", run_dir)
    assert code == 0, err
    top1 = float(re.search(r"top-1 ([\d.]+)%", out).group(1))
    assert top1 == pytest.approx(report["binary"]["top1"], abs=0.01)  # the run's own validation subset
    for args in (["eval", run_dir / "packed.safetensors", "--recipe", run_dir / "recipe.yaml", "--runtime"],
                 ["eval", run_dir / "model.safetensors", "--recipe", run_dir / "recipe.yaml"]):
        code, out, err = cli(capsys, *args)
        assert code == 0, err
        assert float(re.search(r"top-1 ([\d.]+)%", out).group(1)) == pytest.approx(top1, abs=0.01)
        assert re.search(r"top-5 ([\d.]+)%", out)


def test_eval_needs_a_recipe_and_a_packed_file_for_runtime(run_dir, capsys):
    code, _, err = cli(capsys, "eval", run_dir / "packed.safetensors")
    assert code == 2 and "--recipe" in err
    code, _, err = cli(capsys, "eval", run_dir / "model.safetensors", "--recipe", run_dir / "recipe.yaml", "--runtime")
    assert code == 2 and "packed.safetensors" in err
    code, _, err = cli(capsys, "eval", run_dir / "packed.safetensors", "--recipe", ROOT / "recipes" / "cifar10.yaml")
    assert code == 2 and "made for input (1, 28, 28)" in err


def test_hub_weights_without_network_are_one_line(monkeypatch, capsys, tmp_path):
    import timm
    import torchvision
    from huggingface_hub.errors import LocalEntryNotFoundError  # what timm's hub client raises offline
    from urllib.error import URLError

    def offline_timm(*a, **k):
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot "
                                      "find the requested files in the local cache.")

    def offline_torchvision(*a, **k):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(timm, "create_model", offline_timm)
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline_torchvision)
    for model in ("resnet18", "torchvision:resnet18"):
        out = tmp_path / model.replace(":", "_")
        code, _, err = cli(capsys, model, "--convert-only", "--recipe", QUICKSTART, "--out", out,
                           "--set", "model.pretrained=true", "--set", "model.kwargs={}")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "cannot download the hub weights" in err and "--weights FILE or model.pretrained: PATH" in err
        assert not out.exists()


def test_a_bug_in_a_model_is_not_reported_as_a_network_error(monkeypatch):
    import timm

    from irconvert.models import create_model

    def broken(*a, **k):
        raise OSError("disk full")  # not a download failure: it must surface as it is

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(OSError, match="disk full"):
        create_model("resnet18", pretrained=True)


# -- 10. every command of the README on the first command's outputs ----------------------------------------

def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    return [line.split("#")[0].strip() for line in block.splitlines() if line.startswith("irconvert ")]


def concrete(line: str, run: Path, tmp: Path) -> list[list]:
    """The README line `line` with its placeholders filled in on the run `run` (the first command's outputs)."""
    packed = run / "packed.safetensors"
    table = {
        "irconvert MODEL --recipe R": [["resnet18", "--recipe", QUICKSTART, "--out", tmp / "again", *sets(TINY)]],
        "irconvert MODEL1 MODEL2": [["resnet18", "resnet10t", "--recipe", QUICKSTART, "--out", tmp / "batch",
                                     *sets(TINY)]],
        "irconvert MODEL --convert-only": [["resnet18", "--convert-only", "--out", tmp / "check"]],
        "irconvert --models list.yaml": [["--models", tmp / "list.yaml", "--convert-only", "--out", tmp / "list"]],
        "irconvert summary MODEL": [["summary", "resnet18", "--recipe", QUICKSTART],
                                    ["summary", "resnet18", "--input-size", "1,28,28", "--mode", "W1A32"]],
        "irconvert export RUN_DIR": [["export", run], ["export", run / "checkpoint.pt", "--out", tmp / "ex"],
                                     ["export", run / "model.safetensors", "--out", tmp / "ex2"]],
        "irconvert verify packed.safetensors": [["verify", packed]],
        "irconvert eval RUN_DIR": [["eval", run], ["eval", packed, "--recipe", run / "recipe.yaml", "--runtime"]],
        "irconvert bench-runtime packed.safetensors": [["bench-runtime", packed, "--batch", "1", "--repeat", "1"]],
        "irconvert MODEL --recipe R --dry-run": [["resnet18", "--recipe", QUICKSTART, "--out", tmp / "never",
                                                  "--dry-run", *sets(TINY)]],
        "irconvert export RUN_DIR --format tflite": [["export", run, "--format", "tflite"]],  # beside packed
        "irconvert verify model.tflite": [["verify", run / "model.tflite"]],
        "irconvert list-models": [["list-models", "resnet1*"]],
        "irconvert list-recipes": [["list-recipes"]],
    }
    keys = [k for k in table if line.startswith(k)]
    assert keys, f"README command without a test: {line}"
    return table[max(keys, key=len)]


@pytest.mark.slow
def test_every_readme_command_runs_on_the_first_commands_outputs(run_dir, tmp_path, capsys, python_kernels):
    (tmp_path / "list.yaml").write_text("- name: resnet10t\n  set: []\n")
    lines = readme_commands()
    assert len(lines) == 14
    for line in lines:
        for args in concrete(line, run_dir, tmp_path):
            code, out, err = cli(capsys, *args)
            assert code == 0, f"{line}: {err[-2000:]}"
            assert "Traceback" not in err


# -- shipped recipes (issue 30) -------------------------------------------------------------------------

def test_list_recipes_names_every_shipped_recipe(capsys):
    code, out, err = cli(capsys, "list-recipes")
    assert code == 0, err
    shipped = sorted(p.stem for p in (ROOT / "irconvert" / "recipes").glob("*.yaml"))
    assert [line.split()[0] for line in out.splitlines()[:-1]] == shipped and "quickstart" in shipped
    assert re.search(r"^quickstart +The README's first command: convert a pretrained model$", out, re.M)


def test_a_shipped_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    # the recipes lived outside the package, and quickstart named its weights by a checkout's layout
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "resnet18", "--recipe", "quickstart", "--convert-only", "--out", "c")
    assert code == 0, err
    assert (tmp_path / "c" / "packed.safetensors").is_file()
    # a name that is no file and no shipped recipe lists the shipped ones
    code, _, err = cli(capsys, "resnet18", "--recipe", "quickstrat")
    assert code == 2 and "recipe not found" in err and "quickstart" in err and "list-recipes" in err


def test_the_repository_recipes_folder_is_the_shipped_one():
    # `--recipe recipes/quickstart.yaml` from the repository root (the README's first command) reads the
    # same file as `--recipe quickstart`
    from irconvert.recipe import load_recipe

    assert (ROOT / "recipes" / "quickstart.yaml").resolve() == ROOT / "irconvert" / "recipes" / "quickstart.yaml"
    assert load_recipe(QUICKSTART).digest() == load_recipe("quickstart").digest()


@pytest.mark.slow
def test_the_wheel_holds_the_recipes_and_the_weights_they_name(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("irconvert-*.whl"))).namelist()
    for recipe in (ROOT / "irconvert" / "recipes").glob("*.yaml"):
        assert f"irconvert/recipes/{recipe.name}" in names
    assert "irconvert/pretrained/fashion-mnist-resnet18-w16.safetensors" in names  # quickstart's ../pretrained/


# -- issue 30: output streams, scripted use, run folders everywhere, clearer messages ---------------------

def test_a_run_prints_results_on_stdout_and_its_phases_in_words_on_stderr(tmp_path, capsys, fashion_root):
    """stdout: the table, the accuracies, the folder written; stderr: [1/4]..[4/4] and the epochs. The
    report says how long, how big, on how many processes and devices, and the method as trained."""
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "resnet18", "--recipe", QUICKSTART, *sets(TINY), "--out", out)
    assert code == 0, err
    assert "top-1: full precision" in stdout and "parameters:" in stdout and f"wrote {out}" in stdout
    assert "[1/4]" not in stdout and "epoch 1/1" not in stdout
    phases = [line for line in err.splitlines() if re.match(r"\[\d/4\] ", line)]
    assert [p[:5] for p in phases] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], err
    assert "binarized with irnet + RSign + RPReLU" in phases[1] and not re.search(r"\d+ tensors", err + stdout)
    report = json.loads((out / "report.json").read_text())
    assert report["method_as_trained"] == "irnet + RSign + RPReLU" and report["method"] == "irnet"
    assert (report["processes"], report["device"], report["devices"]) == (1, "cpu", 1)
    assert report["seconds"]["total"] >= max(v for k, v in report["seconds"].items() if k != "total")
    assert report["file_bytes"] == {k: os.path.getsize(out / f"{k}.safetensors") for k in ("model", "packed")}


def test_convert_only_dry_run_writes_nothing_and_warnings_go_to_stderr(tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = cli(capsys, "mobilenetv3_small_100", "--convert-only", "--dry-run", "--out", out)
    assert code == 0, err
    assert not out.exists()
    assert re.search(r"^conv_stem\s+\S+\s+keep\s+first layer$", stdout, re.M), stdout
    assert "warning:" in err and "warning:" not in stdout  # mobilenetv3's sigmoid gates and hard-swish


def test_dry_run_of_a_recipe_prints_the_resolved_recipe_and_the_plan(tmp_path, capsys):
    out = tmp_path / "never"
    code, stdout, err = cli(capsys, "resnet18", "--recipe", QUICKSTART, "--set", "train.epochs=7", "--out", out,
                            "--dry-run", "--json")
    assert code == 0, err
    assert not out.exists()
    plan = json.loads(stdout)  # --json: one object on stdout, nothing else
    assert plan["recipe"]["train"]["epochs"] == 7 and plan["recipe"]["binarize"]["rsign"] is True
    kept = {r["layer"]: r["reason"] for r in plan["layers"] if r["mode"] == "keep"}
    assert kept == {"conv1": "first layer", "fc": "last layer",
                    **{f"layer{i}.0.downsample.0": "pattern *.downsample.0" for i in range(1, 5)}}
    assert "[1/4]" not in err  # a dry run loads, plans, and stops


def test_verify_and_bench_runtime_take_a_run_folder(run_dir, capsys, python_kernels):
    code, out, err = cli(capsys, "verify", run_dir)
    assert code == 0, err
    assert "(ok, tolerance" in out
    report = json.loads((run_dir / "report.json").read_text())
    # the packed layers hold RSign's learned thresholds: the same parameters as the trained model
    assert f"parameters: {report['size']['params']:,}" in out
    assert "+1 in" not in out  # a rebuilt model has no calibration batch: no empty column
    code, out, err = cli(capsys, "bench-runtime", run_dir, "--batch", "1", "--repeat", "1")
    assert code == 0, err
    assert "| model packed.safetensors | 1 |" in out
    code, out, err = cli(capsys, "verify", run_dir.parent)
    assert code == 2 and "without packed.safetensors" in err


def test_quiet_prints_nothing_and_json_prints_one_object(run_dir, capsys):
    code, out, err = cli(capsys, "verify", run_dir, "--quiet")
    assert (code, out, err) == (0, "", "")
    code, out, err = cli(capsys, "verify", run_dir, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] is True and result["max_abs_diff"] == 0.0
    assert result["size"]["params"] == json.loads((run_dir / "report.json").read_text())["size"]["params"]
    code, out, err = cli(capsys, "verify", run_dir, "--quiet", "--latent", run_dir / "missing.safetensors")
    assert code == 2 and out == "" and "--latent" in err  # errors still reach stderr


def test_export_of_a_finished_run_to_another_folder_writes_both_files(run_dir, tmp_path, capsys):
    run = tmp_path / "done"
    shutil.copytree(run_dir, run)
    (run / "checkpoint.pt").unlink()  # a finished run: export deleted its checkpoint
    code, out, err = cli(capsys, "export", run, "--out", tmp_path / "elsewhere")
    assert code == 0, err
    for name in ("model.safetensors", "packed.safetensors"):
        assert meta(tmp_path / "elsewhere" / name) == meta(run_dir / name)
        assert f"wrote {tmp_path / 'elsewhere' / name}" in out


def test_a_skeleton_of_another_architecture_says_what_the_file_expects(run_dir):
    import timm

    from irconvert.verify import load_packed

    for kwargs in ({}, {"channels": [8, 16, 32, 64]}):  # a missing downsample; then the stem and head shapes
        with pytest.raises(IRConvertError, match=r"model= is not the architecture this file was made from .*"
                                                 r"create_model\('resnet18', channels=\[8, 16, 32, 64\]"):
            load_packed(run_dir / "packed.safetensors", model=timm.create_model("resnet18", **kwargs))


def test_tolerance_has_help(capsys):
    code, out, _ = cli(capsys, "verify", "--help")
    assert code == 0 and re.search(r"--tolerance FLOAT\s+Largest max \|packed - latent\|", out), out


def test_an_unknown_set_key_is_blamed_on_set_with_close_keys(capsys):
    code, out, err = cli(capsys, "resnet18", "--recipe", QUICKSTART, "--set", "train.epoch=3")
    assert code == 2 and out == ""
    assert err.startswith("irconvert: error: --set train.epoch=3: the recipe has no key train.epoch; did you mean "
                          "train.epochs"), err
    assert "quickstart.yaml" not in err


def test_a_misspelled_recipe_key_gets_close_keys(tmp_path):
    from irconvert.recipe import load_recipe

    bad = tmp_path / "r.yaml"
    bad.write_text("model: {name: resnet18}\ndata: {dataset: mnist}\ntrain: {epoch: 2}\n")
    with pytest.raises(IRConvertError, match=r"r.yaml: train.epoch: unknown key; did you mean train.epochs"):
        load_recipe(bad)


def test_model_names_of_the_other_library_are_suggested():
    from irconvert.models import create_model

    with pytest.raises(IRConvertError, match="did you mean torchvision:mobilenet_v3_small"):
        create_model("mobilenet_v3_small")
    with pytest.raises(IRConvertError, match="did you mean the timm model 'mobilenetv3_small_100'"):
        create_model("torchvision:mobilenetv3_small_100")


def test_a_weights_mismatch_names_whole_keys_on_one_line(tmp_path):
    import timm
    from safetensors.torch import save_file

    from irconvert.models import create_model

    small = {"channels": [8, 16, 32, 64]}
    path = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", **small).state_dict(), str(path))
    with pytest.raises(IRConvertError) as info:
        create_model("resnet34", weights=path, **small)
    msg = str(info.value)
    assert "\n" not in msg and "weights do not fit timm model 'resnet34' (missing: layer1.2.conv1.weight," in msg
    own = timm.create_model("resnet34", **small).state_dict()
    listed = re.search(r"missing: (.*?) \.\.\. \((\d+)\)", msg)
    assert all(k in own for k in listed.group(1).split(", "))  # each key whole, not cut mid-word
    saved = load_file(path)
    # the count is of every missing tensor (timm does not load BatchNorm's num_batches_tracked)
    assert int(listed.group(2)) == len([k for k in own if k not in saved and not k.endswith("num_batches_tracked")])


def test_python_errors_name_arguments_and_the_cli_names_flags(run_dir, capsys):
    from irconvert.errors import flag
    from irconvert.verify import verify_file

    with pytest.raises(IRConvertError) as info:
        verify_file(run_dir / "packed.safetensors", latent=run_dir / "missing.safetensors")
    assert "--" not in str(info.value) and str(info.value).startswith("latent ")
    assert info.value.cli().startswith("--latent ")
    e = IRConvertError(f"x: pass {flag('overwrite')} or {flag('set', 'model.pretrained=false')}")
    assert str(e) == "x: pass overwrite=True or overrides=['model.pretrained=false']"
    assert e.cli() == "x: pass --overwrite or --set model.pretrained=false"


def test_list_models_names_both_libraries_with_what_the_zoo_verified(capsys):
    code, out, err = cli(capsys, "list-models", "*mobilenet*v3_small*")
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert "torchvision:mobilenet_v3_small" in names and "mobilenetv3_small_100" in names
    assert re.search(r"^torchvision:mobilenet_v3_small\s+zoo: ok, \d+\.\d% of MACs binary", out, re.M), out
    code, out, _ = cli(capsys, "list-models", "torchvision:resnet1*", "--json")
    assert [r["name"] for r in json.loads(out)] == ["torchvision:resnet101", "torchvision:resnet152",
                                                    "torchvision:resnet18"]


def test_the_shipped_zoo_summary_is_what_bench_writes():
    """irconvert/zoo_verified.json is generated (python -m bench.zoo_verified), never edited by hand."""
    from bench.zoo_verified import OUT, summarize

    assert json.loads(OUT.read_text()) == summarize()


def test_convert_only_without_a_recipe_takes_policy_sets(tmp_path, monkeypatch, capsys):
    # issue 30: the README's model list gave `set:` to a --convert-only batch without a recipe, and
    # every such entry failed "--set: needs --recipe"; there the policy's fields are what can change
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "test_resnet", "--convert-only", "--set", "binarize.mode=W1A32", "--out", "c")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "report.json").read_text())["mode"] == "W1A32"
    code, _, err = cli(capsys, "test_resnet", "--convert-only", "--set", "train.lr=0.002", "--out", "d")
    assert code == 2 and "only binarize.* fields" in err and not (tmp_path / "d").exists()
