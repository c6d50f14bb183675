"""The one place a user's device choice ("auto", "cpu", "cuda", "cuda:N" or a torch.device)
becomes a torch.device, for training, evaluation and inspection alike."""
from __future__ import annotations

import torch

ACCEPTED = "'auto' (or None), 'cpu', 'cuda', 'cuda:N' or a torch.device of type cpu/cuda"


def resolve_device(device: str | torch.device | None = "auto", arg: str = "device") -> torch.device:
    """'auto'/None -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device
    -> that device, checked to exist. Raises ValueError naming `arg` (e.g. "--device") and the
    accepted values for an unknown device, or a CUDA device that is not available."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{arg} must be {ACCEPTED}, got {device!r}")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except RuntimeError:
        raise ValueError(f"{arg} must be {ACCEPTED}, got {device!r}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"{arg} must be {ACCEPTED}, got {device!r} (device type {dev.type!r} is not supported)")
    if not torch.cuda.is_available():
        raise ValueError(f"{arg}={str(device)!r} but CUDA is not available; use 'cpu' or 'auto'")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{arg}={str(device)!r} but this machine has {count} CUDA device(s): "
                         f"use 'cuda' or 'cuda:0'..'cuda:{count - 1}'")
    return dev
