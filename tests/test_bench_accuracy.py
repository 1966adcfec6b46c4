"""bench/accuracy.py's run pool: one failed run does not lose the others."""

import json
import subprocess

import pytest

import bench.accuracy as acc


def test_a_failed_run_keeps_the_others_and_names_itself(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        seed = int(cmd[cmd.index("--seed") + 1])
        if seed == 1:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nValueError: boom")
        result = cmd[cmd.index("--result") + 1]
        with open(result, "w") as f:
            json.dump({"top1": 88.5, "minutes": 1.0, "binary": json.loads(cmd[cmd.index("--binary") + 1])}, f)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(acc.subprocess, "run", fake_run)
    runs = [("IR-Net", 0), ("IR-Net", 1), ("IR-Net", 2)]
    with pytest.raises(SystemExit, match=r"1 of 3 runs failed \(IR-Net seed 1\).*--resume"):
        acc.run_all(runs, tmp_path / "fp.safetensors", ["train.epochs=1"], tmp_path, "cpu", jobs=2)
    kept = {seed for _, seed in runs if acc.finished(tmp_path, "IR-Net", seed, ["train.epochs=1"]) is not None}
    assert kept == {0, 2}
