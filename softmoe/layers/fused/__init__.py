"""The components' speed paths: `impl="fused"` (the default) on `SoftRouter` (`routing`) and
`Experts` (`experts`), set through the layers (`SoftMoE`, `TokensChoiceMoE`,
`ExpertsChoiceMoE`); `impl="reference"` is plain autograd through softmoe/layers/functional.py.
Each component calls its own fast path and owns its buffers; no layer reaches into another
component (docs/design.md §7).

The fused path computes the same function as the reference code (tested equal in float64 to
1e-12, tests/layers/test_fused_paths.py) with
  - hand-written backwards that keep less and make fewer passes (`routing`, `experts`),
  - the expert matmuls through `softmoe.kernels` (compiled CPU kernels where faster),
  - large CPU buffers reused from step to step (`buffers.BufferPool`, one per component),
  - an inference forward that runs the experts a few at a time (`experts.inference`).
It supports first-order gradients only; `impl="reference"` supports double backward.
It runs under bf16/fp16 autocast too (float32 parameters): routing and mixing in float32, the
experts in the autocast dtype, as the reference path computes them there (docs/design.md §1.3).
Where it does not apply (`applies` is False: other dtypes, the meta device, torch.compile or
tracing, Soft MoE's Table-2 ablations) the reference path runs.
Measured speed: see docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from ..common import autocast_on, check_choice
from .buffers import BufferPool, pool_of, pooled_bytes, release_buffers, set_buffer_reuse

IMPLS = ("fused", "reference")

__all__ = ["IMPLS", "check_impl", "applies", "records_graph", "BufferPool", "pool_of", "pooled_bytes",
           "release_buffers", "set_buffer_reuse"]


def check_impl(impl) -> str:
    return check_choice("impl", impl, IMPLS)


def applies(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` (impl "fused") runs its fused path on `x`: float32/float64 `x` of the
    parameters' dtype; or, under bf16/fp16 autocast, float32 parameters and `x` float32 or of
    the autocast dtype (the component then computes what autocast would: routing in float32,
    experts in the autocast dtype, docs/design.md §1.3); a real device; not under
    torch.compile or tracing."""
    if check_impl(module.impl) != "fused" or x.device.type == "meta":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    p = next(module.parameters(), None)
    dtype = x.dtype if p is None else p.dtype
    if autocast_on(x.device.type):
        low = torch.get_autocast_dtype(x.device.type)
        return low in (torch.bfloat16, torch.float16) and dtype == torch.float32 and x.dtype in (torch.float32, low)
    return x.dtype in (torch.float32, torch.float64) and dtype == x.dtype


def records_graph(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether a forward of `module` on `x` now records an autograd graph (a training step)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
