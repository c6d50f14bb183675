"""The layers' speed paths, behind one seam: `impl="fused"` (the default) on `SoftMoE`,
`TokensChoiceMoE`, `ExpertsChoiceMoE` and `Experts`; `impl="reference"` is plain autograd.

The fused path computes the same function as the reference code in softmoe/layers (tested
equal in float64 to 1e-12, tests/layers/test_fused_paths.py) with
  - hand-written backwards that keep less and make fewer passes (`routing`, `experts`),
  - the expert matmuls through `softmoe.kernels` (compiled CPU kernels where faster),
  - large CPU buffers reused from step to step (`buffers.BufferPool`, one per layer),
  - an inference forward that runs the experts a few at a time (`experts.inference`).
It supports first-order gradients only; `impl="reference"` supports double backward.
Where it does not apply (`applies` is False: other dtypes, autocast, the meta device,
torch.compile or tracing, Soft MoE's Table-2 ablations) the reference path runs.
Measured speed: see docs/benchmarks.md.
"""
from __future__ import annotations

import torch

from ..common import autocast_on, check_choice
from .buffers import BufferPool, pool_of, pooled_bytes, release_buffers, set_buffer_reuse
from .experts import experts_forward
from .routing import FusedCombine, FusedSoftRouting

IMPLS = ("fused", "reference")

__all__ = ["IMPLS", "check_impl", "applies", "records_graph", "soft_moe_forward", "experts_module_forward",
           "BufferPool", "pool_of", "pooled_bytes", "release_buffers", "set_buffer_reuse"]


def check_impl(impl) -> str:
    return check_choice("impl", impl, IMPLS)


def applies(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `module` (impl "fused") runs its fused path on `x`: float32/float64 `x` of the
    parameters' dtype, a real device, no autocast, not under torch.compile or tracing."""
    if check_impl(module.impl) != "fused" or x.dtype not in (torch.float32, torch.float64):
        return False
    if x.device.type == "meta" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    p = next(module.parameters(), None)
    return (p is None or p.dtype == x.dtype) and not autocast_on(x.device.type)


def records_graph(x: torch.Tensor, module: torch.nn.Module) -> bool:
    """Whether a forward of `module` on `x` now records an autograd graph (a training step)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def experts_module_forward(experts: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An `Experts` module's fused forward (E, M, D) -> (E, M, D), with its own pool."""
    train = records_graph(x, experts)
    return experts_forward(experts, x, pool_of(experts) if train else None, train)


def soft_moe_forward(layer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None):
    """A `SoftMoE` layer's fused forward: y (B, N, D), dispatch and combine weights (B, N, S).

    Routing, experts and combine share the layer's pool (the routing backward writes dL/dx
    into the experts' dead hidden buffer). The experts run fused when they are an `Experts`
    whose fused path applies; any other experts module (e.g. an expert-parallel wrapper) is
    called as a module."""
    B, N, _ = x.shape
    E, P, S = layer.num_experts, layer.slots_per_expert, layer.num_slots
    train = records_graph(x, layer)
    pool = pool_of(layer) if train else None
    noise = None
    if layer.training and layer.noise_std > 0:  # drawn as the reference path draws it
        noise = layer.noise_std * torch.randn(B, N, S, dtype=x.dtype, device=x.device)
    slots, dispatch, combine = FusedSoftRouting.apply(
        x, layer.router.slot_weights(x.dtype), mask, noise, layer.router.normalize, E, P, pool)  # (E, P*B, D)
    experts = layer.experts
    if getattr(experts, "impl", None) is not None and applies(experts, slots):
        ys = experts_forward(experts, slots, pool, records_graph(slots, experts))  # (E, P*B, D)
    else:
        ys = experts(slots)
    return FusedCombine.apply(ys, combine, pool), dispatch, combine  # (B, N, D)
