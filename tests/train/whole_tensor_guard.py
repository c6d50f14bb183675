"""`python whole_tensor_guard.py LIMIT softmoe-args...`: runs the `softmoe` CLI with a dispatch
mode that fails the run as soon as any op on this rank produces a tensor (a DTensor's local
shard for DTensors; meta tensors are free and not counted) of LIMIT elements or more, and prints
at exit how many op outputs it checked and the largest. tests/train/test_distributed_train.py
runs it under torchrun to show that no rank ever allocates a whole expert tensor: not at
initialisation, training, checkpointing or evaluation."""
import atexit
import os
import sys

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode


class WholeTensorGuard(TorchDispatchMode):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.checked, self.largest = limit, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                local = t._local_tensor if isinstance(t, DTensor) else t
                if local.device.type == "meta":
                    continue
                self.checked += 1
                self.largest = max(self.largest, local.numel())
                if local.numel() >= self.limit:
                    raise RuntimeError(f"whole-tensor guard: {func} made a {tuple(local.shape)} tensor "
                                       f"({local.numel()} >= {self.limit} elements) on rank {os.environ.get('RANK')}")
        return out


if __name__ == "__main__":
    guard = WholeTensorGuard(int(sys.argv[1]))
    atexit.register(lambda: print(f"guard rank {os.environ.get('RANK', '0')}: {guard.checked} op outputs checked, "
                                  f"largest {guard.largest} elements", flush=True))
    from softmoe.cli import main

    with guard:
        code = main(sys.argv[2:])
    sys.exit(code)
