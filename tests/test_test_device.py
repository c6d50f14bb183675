"""The device plumbing of the suite itself (tests/conftest.py): SOFTMOE_TEST_DEVICE is parsed
into the device under test or a usage error naming it, `cpu_only` tests are skipped on any
other device, and the `device` / `generator` fixtures agree with it. No GPU is needed: CUDA
availability is simulated and the skip logic is run on stand-in test items."""
import pytest
import torch

import conftest


@pytest.fixture
def cuda(monkeypatch):
    def set_available(flag: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: flag)
    return set_available


@pytest.mark.parametrize("value, want", [(None, "cpu"), ("", "cpu"), (" cpu ", "cpu"), ("cuda", "cuda"),
                                         ("cuda:1", "cuda:1")])
def test_the_variable_names_the_device(monkeypatch, cuda, value, want):
    cuda(True)
    if value is None:
        monkeypatch.delenv("SOFTMOE_TEST_DEVICE", raising=False)
    else:
        monkeypatch.setenv("SOFTMOE_TEST_DEVICE", value)
    assert conftest.test_device() == torch.device(want)


@pytest.mark.parametrize("value", ["meta", "mps", "gpu", "cuda:x"])
def test_other_values_are_an_error_naming_the_accepted_ones(monkeypatch, cuda, value):
    cuda(True)
    monkeypatch.setenv("SOFTMOE_TEST_DEVICE", value)
    with pytest.raises(ValueError, match=r"SOFTMOE_TEST_DEVICE must be one of \['cpu', 'cuda'\] \(or 'cuda:N'\), got"):
        conftest.test_device()


def test_cuda_without_cuda_is_an_error(monkeypatch, cuda):
    cuda(False)
    monkeypatch.setenv("SOFTMOE_TEST_DEVICE", "cuda")
    with pytest.raises(ValueError, match=r"SOFTMOE_TEST_DEVICE='cuda' but torch.cuda.is_available\(\) is False"):
        conftest.test_device()


class _Item:
    """Stands in for a collected test: its marker names and the markers added to it."""

    def __init__(self, *marks):
        self.keywords, self.added = set(marks), []

    def add_marker(self, mark):
        self.added.append(mark)


class _Config:
    def __init__(self, device):
        self._softmoe_device = torch.device(device)


@pytest.mark.parametrize("device, skipped", [("cpu", False), ("cuda", True), ("cuda:1", True)])
def test_cpu_only_tests_are_skipped_off_the_cpu(device, skipped):
    plain, cpu_only = _Item(), _Item("cpu_only")
    conftest.pytest_collection_modifyitems(_Config(device), [plain, cpu_only])
    assert not plain.added
    assert bool(cpu_only.added) == skipped
    if skipped:
        (mark,) = cpu_only.added
        assert mark.name == "skip" and f"SOFTMOE_TEST_DEVICE={device}" in mark.kwargs["reason"]


def test_fixtures_follow_the_device_under_test(pytestconfig, device, generator):
    assert device == pytestconfig._softmoe_device == conftest.test_device()
    assert generator.device.type == device.type
    a = torch.randn(3, generator=generator, device=device)
    assert a.device.type == device.type
    assert torch.equal(a, torch.randn(3, generator=torch.Generator(device=device).manual_seed(0), device=device))
