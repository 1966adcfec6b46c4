import os
from pathlib import Path

import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject's addopts): one thread each, not a core's worth of
    # threads per worker fighting over the same cores
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """Real Fashion-MNIST (Debian's dataset-fashion-mnist; .ci/run installs it)."""
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist")
    return FASHION


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def backends():
    """The bitwise runtime's implementations to test: the compiled one (built once, cached on disk) if it
    builds, and the PyTorch fallback."""
    from irconvert.runtime import kernels

    ext, why = kernels._build(os.environ.get("IRCONVERT_MARCH", "native"))
    if ext is None:
        import warnings

        warnings.warn(f"compiled bitwise kernel unavailable ({why}): only the PyTorch fallback is tested")
        return ["python"]
    return ["native", "python"]


def pytest_collection_modifyitems(config, items):
    """Run the tests marked slow first: under pytest-xdist the long ones then start while the short ones
    can still fill the other worker, instead of one of them running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
