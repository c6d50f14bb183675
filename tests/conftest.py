"""Shared test setup: deterministic seeds, and one torch thread per xdist worker (the CI
machine has 2 cores and `make test` runs `-n 2`; more threads per worker only oversubscribe)."""
import os

import pytest
import torch


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it in this worker."""
    torch.manual_seed(0)
    yield
