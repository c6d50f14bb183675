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

    @torch.compiler.disable  # eager under torch.compile: the eager RNG stream, not inductor's
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


class MicroBatchNoise:
    """A layer's `noise_sampler` for the sequences `row_start .. row_stop - 1` of a global batch
    of `global_rows`, run as `micro_batches` equal micro-batches (gradient accumulation): the
    step's first forward draws the layer's noise for the whole global batch (GlobalRowNoise: the
    single process's draw, so the global RNG advances as in one process without accumulation)
    and keeps this process's rows; micro-batch i gets rows i*m .. (i+1)*m - 1 of them
    (m = (row_stop - row_start) / micro_batches). So k micro-batches draw exactly the noise of one
    forward on the whole batch, at the cost of holding this process's noise of one layer
    (b*N*E numbers for a sparse layer, b*N*S for Soft MoE) for the step.

    `select(i)` (`select_micro_batch(model, i)`) before micro-batch i's forward; select(0) starts
    a new step (a fresh draw). A recompute of the forward inside the backward (activation
    checkpointing) gets the same rows again. Called twice for one micro-batch outside a backward:
    ValueError (select was not called), never silently repeated noise."""

    def __init__(self, row_start: int, row_stop: int, global_rows: int, micro_batches: int) -> None:
        self.rows = GlobalRowNoise(row_start, row_stop, global_rows)
        k = check_positive_int("micro_batches", micro_batches)
        local = row_stop - row_start
        if local % k:
            raise ValueError(f"micro_batches={k} must divide this process's {local} rows")
        self.micro_batches, self.micro_rows = k, local // k
        self.index = 0
        self._noise: torch.Tensor | None = None  # (local / G, ...) this process's rows of the step's draw
        self._served = False

    def select(self, index: int) -> None:
        """The next forward is micro-batch `index` of the step (0: a new step, a new draw)."""
        if not 0 <= index < self.micro_batches:
            raise ValueError(f"micro-batch index must be in [0, {self.micro_batches}), got {index}")
        if index == 0:
            self._noise = None
        self.index, self._served = index, False

    @torch.compiler.disable  # eager under torch.compile (as GlobalRowNoise)
    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 group_size: int = 1) -> torch.Tensor:
        G = group_size
        if shape[0] * G != self.micro_rows:
            raise ValueError(f"noise for {shape[0]} routing groups of group_size={G} sequences asked, but a "
                             f"micro-batch holds {self.micro_rows} sequences: key_noise_by_global_rows was given "
                             f"another micro-batch count than the one run")
        recompute = torch._C._current_graph_task_id() != -1  # inside a backward: activation checkpointing
        if self._served and not recompute:
            raise ValueError(f"micro-batch {self.index} drew its noise already: call "
                             f"softmoe.distributed.select_micro_batch(model, i) before each micro-batch's forward")
        if self._noise is None:
            if self.index != 0:
                raise ValueError(f"micro-batch {self.index} runs before micro-batch 0 of the step")
            local = self.micro_rows * self.micro_batches
            self._noise = self.rows((local // G, *shape[1:]), dtype, device, G)  # (b/G, ...) one process's rows
        self._served = True
        lo = self.index * self.micro_rows // G
        return self._noise[lo:lo + shape[0]]

    def __repr__(self) -> str:
        return f"MicroBatchNoise({self.rows!r} in {self.micro_batches} micro-batches)"


def key_noise_by_global_rows(model: nn.Module, rows: tuple[int, int] | None, global_rows: int | None = None,
                             micro_batches: int = 1) -> nn.Module:
    """Give every MoE layer of `model` a `GlobalRowNoise` sampler for this process's sequences
    `rows = (start, stop)` of a global batch of `global_rows` (in place; returns `model`).
    `rows=None` restores the single-process sampler (`torch.randn` on the local shape).
    `micro_batches > 1`: the rows run as that many equal micro-batches (gradient accumulation);
    each layer gets its own `MicroBatchNoise`, and `select_micro_batch(model, i)` must precede
    micro-batch i's forward (one process: rows (0, B)).

    Checks every layer first: a Tokens/Experts Choice layer's group_size must divide the local
    batch (stop - start) and start, or its routing groups would straddle two processes, and the
    micro-batch; a ValueError names the layer and the sizes."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if rows is None:
        for _, layer in layers:
            layer.noise_sampler = standard_normal
        return model
    start, stop = rows
    sampler = GlobalRowNoise(start, stop, global_rows)
    micro_batches = check_positive_int("micro_batches", micro_batches)
    if (stop - start) % micro_batches:
        raise ValueError(f"micro_batches={micro_batches} must divide this process's {stop - start} rows")
    micro = (stop - start) // micro_batches
    for name, layer in layers:
        if isinstance(layer, SparseMoE) and ((stop - start) % layer.group_size or start % layer.group_size):
            raise ValueError(f"{name or 'model'}: group_size={layer.group_size} must divide this process's batch of "
                             f"{stop - start} sequences (rows {start}..{stop - 1} of the global batch of "
                             f"{global_rows}); choose a batch size with batch_size / world_size a multiple of "
                             f"group_size")
        if isinstance(layer, SparseMoE) and micro % layer.group_size:
            raise ValueError(f"{name or 'model'}: group_size={layer.group_size} must divide the micro-batch of "
                             f"{micro} sequences ({micro_batches} micro-batches of rows {start}..{stop - 1})")
    for _, layer in layers:
        layer.noise_sampler = sampler if micro_batches == 1 else MicroBatchNoise(start, stop, global_rows,
                                                                                 micro_batches)
    return model


def select_micro_batch(model: nn.Module, index: int) -> None:
    """Before micro-batch `index`'s forward: every `MicroBatchNoise` sampler of `model` serves
    that micro-batch's rows (index 0: a new step). No-op for the other samplers."""
    for module in model.modules():
        sampler = getattr(module, "noise_sampler", None) if isinstance(module, MoELayer) else None
        if isinstance(sampler, MicroBatchNoise):
            sampler.select(index)
