"""softmoe._device.resolve_device: the one device parser, on machines with and without CUDA
(CUDA availability is simulated, so every branch runs everywhere)."""
import pytest
import torch

from softmoe._device import resolve_device


@pytest.fixture
def cuda(monkeypatch):
    """Pretend the machine has `n` CUDA devices (0 = none)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    return set_count


@pytest.mark.parametrize("n, want", [(0, "cpu"), (2, "cuda")])
def test_auto_and_none_pick_cuda_when_available(cuda, n, want):
    cuda(n)
    assert resolve_device("auto") == resolve_device(None) == resolve_device() == torch.device(want)


@pytest.mark.parametrize("n", [0, 2])
def test_cpu_is_always_available(cuda, n):
    cuda(n)
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_cuda_names_and_devices_where_present(cuda):
    cuda(2)
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_is_a_value_error(cuda, device):
    cuda(0)
    with pytest.raises(ValueError, match=r"^device='cuda(:0)?' but CUDA is not available; use 'cpu' or 'auto'$"):
        resolve_device(device)


def test_a_missing_cuda_index_names_the_valid_ones(cuda):
    cuda(2)
    with pytest.raises(ValueError, match=r"--device='cuda:2' but this machine has 2 CUDA device\(s\): "
                                         r"use 'cuda' or 'cuda:0'..'cuda:1'"):
        resolve_device("cuda:2", arg="--device")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "meta", "mps", torch.device("meta"), 0, 1.5])
def test_unknown_devices_name_the_argument_and_accepted_values(cuda, device):
    cuda(2)
    with pytest.raises(ValueError, match=r"^--device must be 'auto' \(or None\), 'cpu', 'cuda', 'cuda:N' or a "
                                         r"torch.device of type cpu/cuda, got "):
        resolve_device(device, arg="--device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_device():
    n = torch.cuda.device_count()
    assert resolve_device("auto").type == "cuda"
    assert resolve_device(f"cuda:{n - 1}") == torch.device("cuda", n - 1)
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_device(f"cuda:{n}")
