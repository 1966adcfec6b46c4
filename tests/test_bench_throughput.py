"""bench/throughput.py's table row: one eager resnet18 row, the fields the README table reads (no timing asserted)."""

import pytest
import torch

from bench.throughput import run_case


@pytest.mark.slow  # 11 s: two warm-up steps and the peak-memory run at batch 128
def test_a_row_names_its_case_and_has_every_field():
    row = run_case("resnet18-28", torch.device("cpu"), compiled=False, repeats=1, steps=1)
    assert row["case"] == "resnet18 1x28x28" and row["dtype"] == "fp32" and row["batch"] == 128
    assert row["compile"] is False and row["device"] == "cpu"
    for key in ("fp_img_s", "binary_img_s", "ratio", "fp_peak_mib", "binary_peak_mib"):
        assert isinstance(row[key], float), key
