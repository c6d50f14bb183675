"""Router noise keyed by global row: under data / expert parallelism each rank's MoE layers
draw, for their local rows, exactly the training noise one process draws for those rows of
the global batch (docs/distributed.md "Router noise", docs/design.md §6).

    model = parallelize(model, mesh)
    b = B // mesh.world_size                       # this rank's rows of the global batch of B
    key_noise_by_global_rows(model, (mesh.rank * b, (mesh.rank + 1) * b), B)

A layer draws its noise through `layer.noise_sampler` (softmoe.layers.MoELayer); by default
that is `torch.randn` on the local shape, so every rank would draw the same numbers for
different rows. `GlobalRowNoise` instead draws the global batch's noise with the RNG (the same
on every rank: same seed, same sequence of draws) and keeps this rank's rows. The draw is the
single process's draw, so the global RNG also advances exactly as in one process.

Cost: every rank draws the noise of the whole batch, W times its own share: per Soft MoE layer
B*N*S normals (S = E*P slots), per Tokens/Experts Choice layer B*N*E, and a transient buffer of
that size (4 bytes each in float32). The router's own logits cost b*N*S*D (or b*N*E*D)
multiply-adds per rank (b = B/W), so the draw is W/D normals per multiply-add for both kinds:
negligible for W much smaller than the width D (every single-node run), as costly as the
logits themselves at W in the hundreds, where the buffer is also large (B=4096, N=256,
S=256: 1 GiB per layer per step on every rank). The Soft MoE paper trains without noise
(noise_std 0 draws nothing); V-MoE's sparse gates use it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers import MoELayer
from ..layers.common import check_positive_int, standard_normal
from ..layers.sparse import SparseMoE


class GlobalRowNoise:
    """A layer's `noise_sampler` for the sequences `row_start .. row_stop - 1` of a global batch
    of `global_rows` sequences: draws the global (global_rows / group_size, ...) standard normal
    tensor, as one process does, and returns this process's routing groups of it.

    __call__(shape, dtype, device, group_size) -> (shape), shape[0] * group_size == row_stop -
    row_start; ValueError when the local batch is not the declared one or group_size does not
    divide row_start and global_rows (the groups would not be the single process's groups)."""

    def __init__(self, row_start: int, row_stop: int, global_rows: int) -> None:
        check_positive_int("global_rows", global_rows)
        check_positive_int("row_start", row_start, minimum=0)
        check_positive_int("row_stop", row_stop, minimum=row_start + 1)
        if row_stop > global_rows:
            raise ValueError(f"row_stop must be <= global_rows={global_rows}, got {row_stop}")
        self.row_start, self.row_stop, self.global_rows = int(row_start), int(row_stop), int(global_rows)

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 group_size: int = 1) -> torch.Tensor:
        G = group_size
        local = self.row_stop - self.row_start
        if shape[0] * G != local:
            raise ValueError(f"noise for {shape[0]} routing groups of group_size={G} sequences asked, but this "
                             f"process holds rows {self.row_start}..{self.row_stop - 1} ({local} sequences) of the "
                             f"global batch: key_noise_by_global_rows was given another batch than the one run")
        if self.row_start % G or self.global_rows % G:
            raise ValueError(f"group_size={G} must divide this process's first row {self.row_start} and the global "
                             f"batch size {self.global_rows}")
        full = torch.randn((self.global_rows // G, *shape[1:]), dtype=dtype, device=device)  # the single process's draw
        lo = self.row_start // G
        return full[lo:lo + shape[0]].clone()  # a copy: the global buffer is freed now

    def __repr__(self) -> str:
        return f"GlobalRowNoise(rows {self.row_start}..{self.row_stop - 1} of {self.global_rows})"


def key_noise_by_global_rows(model: nn.Module, rows: tuple[int, int] | None, global_rows: int | None = None
                             ) -> nn.Module:
    """Give every MoE layer of `model` a `GlobalRowNoise` sampler for this process's sequences
    `rows = (start, stop)` of a global batch of `global_rows` (in place; returns `model`).
    `rows=None` restores the single-process sampler (`torch.randn` on the local shape).

    Checks every layer first: a Tokens/Experts Choice layer's group_size must divide the local
    batch (stop - start) and start, or its routing groups would straddle two processes; a
    ValueError names the layer and the sizes."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if rows is None:
        for _, layer in layers:
            layer.noise_sampler = standard_normal
        return model
    start, stop = rows
    sampler = GlobalRowNoise(start, stop, global_rows)
    for name, layer in layers:
        if isinstance(layer, SparseMoE) and ((stop - start) % layer.group_size or start % layer.group_size):
            raise ValueError(f"{name or 'model'}: group_size={layer.group_size} must divide this process's batch of "
                             f"{stop - start} sequences (rows {start}..{stop - 1} of the global batch of "
                             f"{global_rows}); choose a batch size with batch_size / world_size a multiple of "
                             f"group_size")
    for _, layer in layers:
        layer.noise_sampler = sampler
    return model
