"""Shared test setup: deterministic seeds, one torch thread per xdist worker (the CI machine
has 2 cores and `make test` runs `-n 2`; more threads per worker only oversubscribe), and the
device the device-agnostic tests run on.

`SOFTMOE_TEST_DEVICE=cuda python -m pytest tests/layers tests/models tests/train` runs the same
assertions on a GPU: tests take the `device` fixture (and `generator`, drawing on that device);
tests that only make sense on the CPU are marked `cpu_only` and skipped there. Default: cpu."""
import os

import pytest
import torch

TEST_DEVICES = ("cpu", "cuda")  # meta has no values to compare; mps/xpu are not tested


def test_device() -> torch.device:
    """The device of SOFTMOE_TEST_DEVICE ("cpu" when unset), or a ValueError naming it."""
    name = os.environ.get("SOFTMOE_TEST_DEVICE", "cpu").strip() or "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in TEST_DEVICES:
        raise ValueError(f"SOFTMOE_TEST_DEVICE must be one of {list(TEST_DEVICES)} (or 'cuda:N'), got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"SOFTMOE_TEST_DEVICE={name!r} but torch.cuda.is_available() is False on this machine")
    return dev


test_device.__test__ = False  # a helper, not a test


def pytest_configure(config):
    try:
        config._softmoe_device = test_device()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if config._softmoe_device.type == "cpu":
        return
    skip = pytest.mark.skip(reason=f"cpu_only (SOFTMOE_TEST_DEVICE={config._softmoe_device})")
    for item in items:
        if "cpu_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device(pytestconfig) -> torch.device:
    """The device under test (SOFTMOE_TEST_DEVICE, default cpu)."""
    return pytestconfig._softmoe_device


@pytest.fixture
def generator(device) -> torch.Generator:
    """A generator on the device under test, seeded 0: `torch.randn(..., generator=generator,
    device=device)`. (CPU and CUDA streams differ: tests compare against references computed
    from the same draws, never against stored numbers.)"""
    return torch.Generator(device=device).manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it in this worker."""
    torch.manual_seed(0)
    yield
