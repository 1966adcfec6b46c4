"""The fault battery (issue 16): every bad input through the real CLI ends in exit code 2, exactly
one line on stderr, no traceback, and the folder it ran in unchanged; a bug prints one line and a
log path; Ctrl-C says how to resume; kill -9 then --resume ends bit-identical.

The battery runs in-process (`irconvert.cli.main`, the function `python -m irconvert` calls) in a
fresh folder holding a tiny Fashion-MNIST-format data set, so a case costs milliseconds to a second.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import cli

ROOT = Path(__file__).resolve().parents[1]
IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
       "t10k-labels-idx1-ubyte.gz")
# a whole run in seconds: a 0.4M-parameter timm test model, 64 training images
TINY = """\
model: {name: test_resnet, first_stride: 1, stem_pool: false}
data: {dataset: fashion-mnist, root: data, batch_size: 16, download: false}
teacher: {finetune: {epochs: 1, max_steps_per_epoch: 2}}
train: {epochs: 2, max_steps_per_epoch: 2, optimizer: adamw}
output: {plot: false}
"""


def write_idx(path: Path, t: torch.Tensor) -> None:
    """Write `t` as a gzipped uint8 IDX file (the MNIST format)."""
    head = b"\0\0\x08" + bytes([t.dim()]) + b"".join(struct.pack(">I", d) for d in t.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + t.to(torch.uint8).numpy().tobytes())


def tiny_data(root: Path, n: int = 64, m: int = 32) -> Path:
    """Write a random 10-class, 28x28 grey data set in Fashion-MNIST's file layout."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name, t in zip(IDX, (torch.randint(0, 256, (n, 28, 28), generator=g), torch.arange(n) % 10,
                             torch.randint(0, 256, (m, 28, 28), generator=g), torch.arange(m) % 10)):
        write_idx(root / name, t)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Return {relative path: (size, mtime)} of every file and folder under `root`."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh working folder with the tiny data set and a recipe `r.yaml` that runs on it."""
    monkeypatch.chdir(tmp_path)
    tiny_data(tmp_path / "data")
    (tmp_path / "r.yaml").write_text(TINY)
    return tmp_path


# -- helpers that prepare one case's inputs (inside ws, before the snapshot) -------------------------

def _file(name: str, data) -> callable:
    def make(ws: Path) -> None:
        p = ws / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return make


def _recipe(text: str) -> callable:
    return _file("bad.yaml", text)


def _truncate(name: str, keep: int = 200) -> callable:
    def make(ws: Path) -> None:
        p = ws / "data" / name
        p.write_bytes(p.read_bytes()[:keep])
    return make


def _fake_run(ckpt) -> callable:
    """A run folder `run/` with this recipe and checkpoint.pt (bytes, or a dict torch.save writes)."""
    def make(ws: Path) -> None:
        from irconvert.recipe import load_recipe

        (ws / "run").mkdir()
        (ws / "run" / "recipe.yaml").write_text(load_recipe(ws / "r.yaml").to_yaml())
        if isinstance(ckpt, bytes):
            (ws / "run" / "checkpoint.pt").write_bytes(ckpt)
        else:
            torch.save(ckpt, ws / "run" / "checkpoint.pt")
    return make


def _finished_run(ws: Path) -> None:
    """A finished run folder `done/`: the recipe, a report, the model files; no checkpoint (export removed it)."""
    from irconvert.recipe import load_recipe

    (ws / "done").mkdir()
    (ws / "done" / "recipe.yaml").write_text(load_recipe(ws / "r.yaml").to_yaml())
    (ws / "done" / "report.json").write_text(json.dumps({"model": "test_resnet", "binary": {"top1": 12.5}}))
    (ws / "done" / "model.safetensors").write_bytes(b"the run's model")


def _weights_of(name: str, file: str = "w.safetensors", **kwargs) -> callable:
    def make(ws: Path) -> None:
        from irconvert.models import create_model
        from safetensors.torch import save_file

        save_file(create_model(name, **kwargs).state_dict(), ws / file)
    return make


def _torch_save(name: str, obj) -> callable:
    def make(ws: Path) -> None:
        torch.save(obj, ws / name)
    return make


def _packed(ws: Path) -> None:
    """A real packed.safetensors / model.safetensors pair (test_resnet, --convert-only) in `pk/`."""
    from irconvert.run import convert_only

    convert_only("test_resnet", ws / "pk", log=lambda *a: None, num_classes=10, in_chans=1)


def _then(*makers) -> callable:
    def make(ws: Path) -> None:
        for m in makers:
            m(ws)
    return make


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
RUN = ["test_resnet", "--recipe", "r.yaml"]

# (id, prepare or None, CLI arguments, words the one line must hold)
CASES = [
    # -- the recipe file
    ("recipe-missing", None, ["test_resnet", "--recipe", "nope.yaml"], "recipe not found"),
    ("recipe-is-folder", _file("rdir/x", ""), ["test_resnet", "--recipe", "rdir"], "rdir"),
    ("recipe-empty", _recipe(""), ["test_resnet", "--recipe", "bad.yaml"], "recipe is empty"),
    ("recipe-not-mapping", _recipe("- a\n- b\n"), ["test_resnet", "--recipe", "bad.yaml"], "YAML mapping"),
    ("recipe-bad-yaml", _recipe("model: [1, 2\n"), ["test_resnet", "--recipe", "bad.yaml"], "not valid YAML"),
    ("recipe-billion-laughs", _recipe(BILLION_LAUGHS), ["test_resnet", "--recipe", "bad.yaml"], "expands to more than"),
    ("recipe-deep", _recipe("model: " + "[" * 3000 + "]" * 3000 + "\n"), ["test_resnet", "--recipe", "bad.yaml"],
     "nested deeper than"),
    ("recipe-alias-loop", _recipe("model: &m [*m]\n"), ["test_resnet", "--recipe", "bad.yaml"], "refers to its own anchor"),
    ("recipe-too-big", _recipe("#" * (1 << 20) + "\n"), ["test_resnet", "--recipe", "bad.yaml"], "too large"),
    ("recipe-not-text", _file("bad.yaml", b"\xff\xfe\x00model"), ["test_resnet", "--recipe", "bad.yaml"], "bad.yaml"),
    ("recipe-unknown-field", _recipe(TINY.replace("epochs: 2,", "epoch: 2,")), ["test_resnet", "--recipe", "bad.yaml"],
     "train.epoch: unknown key"),
    ("recipe-unknown-section", _recipe(TINY + "extra: {a: 1}\n"), ["test_resnet", "--recipe", "bad.yaml"],
     "extra: unknown key"),
    ("recipe-wrong-type", _recipe(TINY.replace("epochs: 2,", "epochs: two,")), ["test_resnet", "--recipe", "bad.yaml"],
     "train.epochs"),
    ("recipe-negative-epochs", _recipe(TINY.replace("epochs: 2,", "epochs: -1,")),
     ["test_resnet", "--recipe", "bad.yaml"], "train.epochs"),
    ("recipe-unknown-dataset", _recipe(TINY.replace("fashion-mnist", "imagenet-22k")),
     ["test_resnet", "--recipe", "bad.yaml"], "data.dataset"),
    ("recipe-extends-missing", _recipe("extends: gone.yaml\n"), ["test_resnet", "--recipe", "bad.yaml"], "gone.yaml"),
    ("recipe-extends-loop", _recipe("extends: bad.yaml\n"), ["test_resnet", "--recipe", "bad.yaml"], "loops back"),
    ("no-recipe", None, ["test_resnet"], "--recipe"),
    # -- --set and the other options
    ("set-no-equals", None, [*RUN, "--set", "train.epochs"], "expected key.path=value"),
    ("set-unknown-key", None, [*RUN, "--set", "train.epoch=2"], "--set train.epoch=2: the recipe has no key train.epoch; did you mean train.epochs"),
    ("set-wrong-type", None, [*RUN, "--set", "train.lr=fast"], "train.lr"),
    ("set-under-a-value", None, [*RUN, "--set", "train.epochs.x=1"], "epochs is not a section"),
    ("set-bad-image-size", None, [*RUN, "--set", "data.image_size=4"], "data.image_size"),
    ("seed-not-int", None, [*RUN, "--seed", "abc"], "--seed"),
    ("seed-too-large", None, [*RUN, "--seed", str(2**64)], "train.seed"),
    ("seed-negative", None, [*RUN, "--seed", "-3"], "train.seed"),
    ("unknown-option", None, [*RUN, "--frobnicate"], "--frobnicate"),
    ("resume-and-overwrite", None, [*RUN, "--resume", "--overwrite"], "--resume and --overwrite"),
    ("device-mps", None, [*RUN, "--device", "mps"], "train.device"),
    ("device-gpu-index", None, [*RUN, "--device", "cuda:99"], "train.device"),
    ("device-nonsense", None, [*RUN, "--device", "toaster"], "train.device"),
    ("optimizer-unknown", None, [*RUN, "--set", "train.optimizer=adamz"], "train.optimizer: 'adamz'"),
    ("optimizer-unknown-teacher", None, [*RUN, "--set", "teacher.finetune.optimizer=sgdd"],
     "teacher.finetune.optimizer"),
    # -- the output folder
    ("out-is-file", _file("taken", "x"), [*RUN, "--out", "taken"], "is a file"),
    ("out-under-file", _file("taken", "x"), [*RUN, "--out", "taken/run"], "lies under"),
    ("out-holds-other-files", _file("other/notes.txt", "mine"), [*RUN, "--out", "other"], "holds no irconvert run"),
    ("out-holds-a-run", _fake_run(b"x"), [*RUN, "--out", "run"], "already holds a run"),
    # issue 30: a finished run is not offered --resume (it has nothing to continue)
    ("out-holds-a-finished-run", _finished_run, [*RUN, "--out", "done"],
     "holds a finished run (report.json); pass --overwrite to run it again, or another --out"),
    ("resume-finished-other-recipe", _finished_run, [*RUN, "--out", "done", "--resume", "--set", "train.lr=0.5"],
     "different recipe"),
    ("resume-no-run", None, [*RUN, "--out", "empty", "--resume"], "holds no run to resume"),
    ("resume-truncated-checkpoint", _fake_run(b"PK\x03\x04truncated"), [*RUN, "--out", "run", "--resume"],
     "not a readable irconvert checkpoint"),
    ("resume-not-a-checkpoint", _fake_run({"x": torch.zeros(2)}), [*RUN, "--out", "run", "--resume"],
     "not an irconvert checkpoint"),
    ("resume-other-recipe", _fake_run({k: "0" * 16 if k == "recipe_hash" else {} for k in
                                       ("recipe_hash", "stage", "epoch", "model", "teacher", "history", "optimizer")}),
     [*RUN, "--out", "run", "--resume"], "different recipe"),
    # -- the model and its weights
    ("model-unknown-close", None, ["resnt18", "--recipe", "r.yaml"], "did you mean resnet18"),
    ("model-unknown-torchvision", None, ["torchvision:resnet17", "--recipe", "r.yaml"], "unknown torchvision"),
    ("model-bad-source", None, [*RUN, "--set", "model.source=keras"], "model.source"),
    ("model-bad-kwargs", None, [*RUN, "--set", "model.kwargs.wings=2"], "model.kwargs"),
    ("weights-missing", None, [*RUN, "--weights", "gone.safetensors"], "weights file not found"),
    ("weights-not-safetensors", _file("w.safetensors", b"\x00" * 64), [*RUN, "--weights", "w.safetensors"],
     "cannot read weights"),
    ("weights-pickle-refused", _torch_save("w.pth", {"model": torch.nn.Linear(2, 2)}), [*RUN, "--weights", "w.pth"],
     "never unpickles"),
    ("weights-not-tensors", _torch_save("w.pth", {"a": 1}), [*RUN, "--weights", "w.pth"], "no state_dict of tensors"),
    # 1000-class files on a 10-class model: timm drops the head and loads the rest non-strictly
    ("weights-other-arch-unexpected", _weights_of("resnet34"),
     ["resnet18", "--recipe", "r.yaml", "--weights", "w.safetensors"], "(unexpected: layer1.2."),
    ("weights-other-arch-missing", _weights_of("resnet18"),
     ["resnet34", "--recipe", "r.yaml", "--weights", "w.safetensors"], "(missing: layer1.2."),
    ("weights-other-arch-strict", _weights_of("resnet18", num_classes=10),
     ["resnet10t", "--recipe", "r.yaml", "--weights", "w.safetensors"], "weights do not fit timm model 'resnet10t'"),
    ("weights-other-arch-torchvision", _weights_of("torchvision:resnet18"),
     ["torchvision:resnet34", "--recipe", "r.yaml", "--weights", "w.safetensors"], "weights do not fit"),
    # -- the data
    ("data-root-missing", None, [*RUN, "--set", "data.root=/nonexistent"], "/nonexistent has no fashion-mnist"),
    ("data-root-empty", _file("void/.keep", ""), [*RUN, "--set", "data.root=void"], "has no fashion-mnist"),
    ("data-truncated-images", _truncate(IDX[0]), RUN, IDX[0]),
    ("data-truncated-labels", _truncate(IDX[3], 30), RUN, IDX[3]),
    ("data-not-gzip", _file("data/" + IDX[2], b"not gzip at all"), RUN, IDX[2]),
    ("data-not-idx", _file("data/" + IDX[1], gzip.compress(b"hello world, not IDX")), RUN, "not a whole uint8 IDX"),
    ("data-count-mismatch", lambda ws: write_idx(ws / "data" / IDX[1], torch.zeros(10)), RUN, "do not belong together"),
    # -- --convert-only (the CI check)
    ("check-out-under-file", _file("taken", "x"), ["test_resnet", "--convert-only", "--out", "taken/x"], "lies under"),
    ("check-unknown-model", None, ["resnet1800", "--convert-only", "--out", "c"], "unknown timm model"),
    ("check-bad-recipe", _recipe(BILLION_LAUGHS), ["test_resnet", "--convert-only", "--recipe", "bad.yaml"],
     "expands to more than"),
    ("check-weights-pickle", _torch_save("w.pth", {"model": torch.nn.Linear(2, 2)}),
     ["test_resnet", "--convert-only", "--weights", "w.pth", "--out", "c"], "never unpickles"),
    # -- model lists (batch)
    ("models-file-missing", None, ["--models", "gone.yaml", "--convert-only"], "model list not found"),
    ("models-not-a-list", _file("m.yaml", "resnet18: yes\n"), ["--models", "m.yaml", "--convert-only"],
     "a model list is a YAML list"),
    ("models-bad-entry", _file("m.yaml", "- {name: resnet18, set: train.lr=1}\n"), ["--models", "m.yaml", "--convert-only"],
     "entry 1"),
    # issue 30: every entry is checked before the first model runs (the README's list converted the
    # others, then failed with exit 1)
    ("models-set-without-recipe", _file("m.yaml", "- test_resnet\n- name: torchvision:mobilenet_v3_small\n"
                                                  "  set: [train.lr=0.002]\n"),
     ["--models", "m.yaml", "--convert-only", "--out", "b"],
     "m.yaml: entry 2 (torchvision:mobilenet_v3_small): --set 'train.lr=0.002': without --recipe"),
    ("models-set-bad-policy", _file("m.yaml", "- test_resnet\n- {name: resnet18, set: [binarize.mode=W2A2]}\n"),
     ["--models", "m.yaml", "--convert-only", "--out", "b"], "entry 2 (resnet18): --set: binarize.mode"),
    ("models-set-unknown-recipe-key", _file("m.yaml", "- test_resnet\n- {name: resnet18, set: [train.epoch=2]}\n"),
     ["--models", "m.yaml", "--recipe", "r.yaml", "--out", "b"], "entry 2 (resnet18): --set train.epoch=2: the recipe has no key train.epoch; did you mean train.epochs"),
    ("models-unknown-name", _file("m.yaml", "- test_resnet\n- resnet18\n- resnet_nineteen\n"),
     ["--models", "m.yaml", "--convert-only", "--out", "b"],
     "m.yaml: entry 3 (resnet_nineteen): model.name: unknown timm model 'resnet_nineteen'"),
    ("batch-unknown-name", None, ["test_resnet", "mobilenet_v3_small", "--convert-only", "--out", "b"],
     "unknown timm model 'mobilenet_v3_small'; did you mean torchvision:mobilenet_v3_small?"),
    ("models-billion-laughs", _file("m.yaml", BILLION_LAUGHS), ["--models", "m.yaml", "--convert-only"],
     "expands to more than"),
    ("batch-no-models", None, ["batch", "--convert-only"], "no model given"),
    # -- export, verify, summary on files that are not what they should be
    ("export-missing", None, ["export", "gone"], "not a run folder"),
    ("export-folder-without-run", _file("d/x.txt", "x"), ["export", "d"], "not a run folder"),
    ("export-truncated-checkpoint", _fake_run(b"PK\x03\x04"), ["export", "run"], "not a readable irconvert checkpoint"),
    ("export-foreign-checkpoint", _fake_run({"x": torch.zeros(1)}), ["export", "run"], "not an irconvert checkpoint"),
    ("export-garbage-safetensors", _file("g.safetensors", b"\x10" * 40), ["export", "g.safetensors"],
     "not a readable safetensors"),
    ("export-foreign-safetensors", _weights_of("test_resnet", "f.safetensors"), ["export", "f.safetensors"],
     "not an irconvert file"),
    ("verify-missing", None, ["verify", "gone.safetensors"], "file not found"),
    ("verify-truncated-packed", _then(_packed, lambda ws: (ws / "pk/packed.safetensors").write_bytes(
        (ws / "pk/packed.safetensors").read_bytes()[:5000])), ["verify", "pk/packed.safetensors"], "truncated"),
    ("verify-latent-as-packed", _packed, ["verify", "pk/model.safetensors"], "expected irconvert-packed"),
    ("summary-unknown-model", None, ["summary", "resnt18"], "did you mean"),
    ("summary-bad-input-size", None, ["summary", "test_resnet", "--input-size", "28x28"], "--input-size"),
    ("summary-bad-method", None, ["summary", "test_resnet", "--method", "nomethod"], "--method"),
]


@pytest.mark.parametrize("prepare, args, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ws, capsys, prepare, args, words):
    if prepare is not None:
        prepare(ws)
    capsys.readouterr()
    before = snapshot(ws)
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("irconvert: error: "), err
    assert words in lines[0] and "Traceback" not in err
    assert snapshot(ws) == before


def test_the_battery_has_at_least_45_cases():
    assert len(CASES) >= 45 and len({c[0] for c in CASES}) == len(CASES)


# -- bugs and Ctrl-C --------------------------------------------------------------------------------

def test_internal_error_is_one_line_with_a_log_of_the_traceback(ws, capsys, monkeypatch):
    import irconvert.commands

    def broken(**_):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(irconvert.commands, "run_one", broken)
    code, _, err = cli(capsys, *RUN)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "internal error ZeroDivisionError: a bug" in lines[0]
    log = Path(lines[0].rpartition("traceback in ")[2].rstrip(")"))
    assert "Traceback" in log.read_text() and "ZeroDivisionError: a bug" in log.read_text()
    log.unlink()


def test_an_eof_error_inside_is_a_bug_not_an_abort(ws, capsys, monkeypatch):
    # click turns EOFError into Abort; a truncated file used to be reported as "aborted", exit 130
    import irconvert.commands

    monkeypatch.setattr(irconvert.commands, "run_one", lambda **_: (_ for _ in ()).throw(EOFError("short read")))
    code, _, err = cli(capsys, *RUN)
    assert code == 1 and "internal error EOFError: short read" in err
    Path(err.strip().rpartition("traceback in ")[2].rstrip(")")).unlink()


def test_ctrl_c_says_the_exact_command_to_resume(ws, capsys, monkeypatch):
    import irconvert.commands

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr(irconvert.commands, "run_one", interrupted)
    code, _, err = cli(capsys, *[*RUN, "--out", "my run", "--overwrite", "--set", "train.lr=0.01"])
    assert code == 130
    assert err.strip() == ("irconvert: interrupted; continue with: irconvert test_resnet --recipe r.yaml "
                           "--out 'my run' --set train.lr=0.01 --resume")


# -- faults during a run ----------------------------------------------------------------------------

def test_yaml_bounds_keep_anchors_and_merge_keys_working():
    from irconvert.recipe import safe_yaml

    assert safe_yaml("a: &a {x: 1}\nb: *a\nc: {<<: *a, y: 2}\n") == {"a": {"x": 1}, "b": {"x": 1}, "c": {"x": 1, "y": 2}}


@pytest.mark.slow
def test_non_finite_run_stops_with_exit_2_and_keeps_a_resumable_checkpoint(ws, capsys):
    args = [*RUN, "--out", "nf", "--set", "train.optimizer=sgd", "--set", "train.lr=1e30",
            "--set", "train.max_steps_per_epoch=1"]
    code, _, err = cli(capsys, *args)
    # stderr carries the run's progress too (issue 30: results on stdout, the rest on stderr); the error is
    # one line, the last
    lines = [line for line in err.strip().splitlines() if line.startswith("irconvert: error")]
    assert code == 2 and len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert "val loss is nan after binary epoch 1" in lines[0] and "checkpoint of teacher epoch 1 is kept" in lines[0]
    assert "Traceback" not in err
    rows = [json.loads(line) for line in (ws / "nf" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stage"] == "binary" and rows[-1]["val_loss"] is None  # JSON null, not NaN
    state = torch.load(ws / "nf" / "checkpoint.pt", weights_only=True)
    assert state["stage"] == "teacher" and all(torch.isfinite(v).all() for v in state["model"].values()
                                               if v.is_floating_point())
    # the kept checkpoint resumes (into the same divergence: the recipe is unchanged)
    code, _, err = cli(capsys, *[*args, "--resume"])
    assert code == 2 and "after binary epoch 1" in err and "Traceback" not in err


def _cli(ws: Path, *args, **env_vars) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT), **env_vars}
    return subprocess.Popen([sys.executable, "-m", "irconvert", *args], cwd=ws, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


KILL_RUN = [*RUN, "--set", "train.max_steps_per_epoch=4", "--set", "train.epochs=3"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """model.safetensors of the run the killed ones must reproduce."""
    ws = tmp_path_factory.mktemp("full")
    tiny_data(ws / "data")
    (ws / "r.yaml").write_text(TINY)
    full = _cli(ws, *KILL_RUN, "--out", "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()
    return ws / "full" / "model.safetensors"


def _started(run: Path) -> bool:
    return (run / "recipe.yaml").is_file()


def _binary_epoch_done(run: Path) -> bool:
    return any('"binary"' in line for line in _lines(run / "metrics.jsonl"))


@pytest.mark.slow
@pytest.mark.parametrize("when", [_started, _binary_epoch_done], ids=["before-first-checkpoint", "inside-binary-stage"])
def test_kill_9_then_resume_is_bit_identical(ws, uninterrupted, when):
    from safetensors.torch import load_file

    part = _cli(ws, *KILL_RUN, "--out", "part")
    deadline = time.time() + 600
    while not when(ws / "part"):
        assert part.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    part.send_signal(signal.SIGKILL)
    part.wait()
    assert not (ws / "part" / "model.safetensors").exists()
    (ws / "part" / ".checkpoint.pt.half.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-save leaves

    resumed = _cli(ws, *KILL_RUN, "--out", "part", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = load_file(uninterrupted), load_file(ws / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((ws / "part").glob(".*.tmp"))


def test_resume_of_a_finished_run_says_so_and_changes_nothing(ws, capsys):
    # issue 30: the export had removed the checkpoint, so --resume trained again from scratch and
    # rewrote every file; exit 0, as the run asked for is there (a loop re-running the line ends)
    _finished_run(ws)
    before = snapshot(ws)
    code, out, err = cli(capsys, *RUN, "--out", "done", "--resume")
    assert code == 0 and err == "" and snapshot(ws) == before, err  # the command's outcome: stdout
    assert out.strip() == ("done: the run is finished (report.json, binary top-1 12.50%); nothing to continue, "
                           "nothing changed; pass --overwrite to run it again")


# a recipe in its own folder whose weights path is relative to it (the quickstart's shape), with one
# binary epoch long enough to interrupt before its checkpoint
SLOW_EPOCH = """\
model: {name: test_resnet, first_stride: 1, stem_pool: false, pretrained: ../w.safetensors}
data: {dataset: fashion-mnist, root: data, batch_size: 16, download: false}
train: {epochs: 1, optimizer: adamw}
output: {plot: false}
"""


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_then_the_printed_line_finishes_the_run(tmp_path, capsys):
    # issue 30: the printed `--resume` line failed "made by a different recipe", and without --resume
    # the folder "already holds a run; pass --resume": a loop
    from irconvert.models import create_model
    from safetensors.torch import save_file

    ws = tmp_path / "ws"
    tiny_data(ws / "data", n=256)
    (ws / "rec").mkdir()
    (ws / "rec" / "r.yaml").write_text(SLOW_EPOCH)
    save_file(create_model("test_resnet", num_classes=10, in_chans=1).state_dict(), ws / "w.safetensors")
    python_sign = {"IRCONVERT_TRAIN_KERNELS": "python"}  # the same numbers, no kernel build to wait for
    part = _cli(ws, "test_resnet", "--recipe", "rec/r.yaml", "--out", "int", **python_sign)
    deadline = time.time() + 300
    while not _started(ws / "int"):
        assert part.poll() is None and time.time() < deadline, part.stderr.read()
        time.sleep(0.01)
    part.send_signal(signal.SIGINT)
    err = part.communicate(timeout=120)[1]
    assert part.returncode == 130 and not (ws / "int" / "checkpoint.pt").exists(), err
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "continue with: irconvert " in line, err
    again = _cli(ws, *shlex.split(line.partition("continue with: irconvert ")[2]), **python_sign)
    assert again.wait(timeout=600) == 0, again.stderr.read()
    assert (ws / "int" / "packed.safetensors").is_file() and (ws / "int" / "report.json").is_file()

    # the run's own recipe.yaml rebuilds the same model from another folder (it named the weights
    # relative to the working folder, then resolved them relative to itself: "weights file not found")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = _in(elsewhere, capsys, "test_resnet", "--recipe", ws / "int" / "recipe.yaml", "--convert-only",
                         "--out", "check")
    assert code == 0 and (elsewhere / "check" / "packed.safetensors").is_file(), err
    # ... and is the same recipe there: --resume finds the finished run, not "a different recipe"
    before = snapshot(ws / "int")
    code, out, err = _in(elsewhere, capsys, "test_resnet", "--recipe", ws / "int" / "recipe.yaml", "--out",
                         ws / "int", "--resume")
    assert code == 0 and "the run is finished" in out and snapshot(ws / "int") == before, err


def _in(folder: Path, capsys, *args) -> tuple[int, str, str]:
    """Run `irconvert ARGS` in this process with `folder` as the working folder."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        return cli(capsys, *args)
    finally:
        os.chdir(here)


def test_resume_refuses_a_run_folder_of_another_recipe_before_its_first_checkpoint(ws, capsys):
    from irconvert.recipe import load_recipe

    (ws / "run").mkdir()
    (ws / "run" / "recipe.yaml").write_text(load_recipe(ws / "r.yaml").to_yaml())
    before = snapshot(ws)
    code, _, err = cli(capsys, *[*RUN, "--out", "run", "--resume", "--set", "train.lr=0.5"])
    assert code == 2 and "made by a different recipe" in err and snapshot(ws) == before


def test_a_folder_holding_only_partial_files_is_a_fresh_start(tmp_path):
    from irconvert.runfolder import prepare_out_dir, remove_partial_files

    (tmp_path / ".recipe.yaml.ab12.tmp").write_text("half")
    assert prepare_out_dir(tmp_path, "0" * 16, resume=False, overwrite=False) is None
    (tmp_path / "keep.tmp").write_text("not ours")
    remove_partial_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tmp"]


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []
