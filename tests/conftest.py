import os
from pathlib import Path

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """Real Fashion-MNIST (Debian's dataset-fashion-mnist; .ci/run installs it)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    return FASHION


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
