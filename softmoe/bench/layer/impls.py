"""The implementations under test, built by name at a Shape, and one step of each kind
(no-grad forward, training step) on the benchmark's fixed inputs."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from .naive import NaiveSoftMoE
from .ports import build_bwconrad, build_lucidrains
from .shape import DTYPES, Shape


def _build_softmoe(s: Shape) -> nn.Module:
    from softmoe import SoftMoE

    return SoftMoE(s.dim, s.experts, s.slots, s.hidden)


def _build_naive(s: Shape) -> nn.Module:
    return NaiveSoftMoE(s.dim, s.experts, s.slots, s.hidden)


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Shape], nn.Module]
    module: str | None  # import that must succeed, None = always available
    note: str


IMPLS = (
    Impl("softmoe", _build_softmoe, None,
         "this project: experts stacked as (E, D, H) weights, two batched matmuls (softmoe.kernels where "
         "they apply); routing in float32; "
         "fused autograd nodes; weight-grad and activation buffers reused between training steps (BufferPool)."),
    Impl("naive-loop", _build_naive, None,
         "the same function as softmoe (tests check equal outputs and grads in float64), one "
         "nn.Sequential(Linear, GELU-tanh, Linear) per expert in a Python loop, einsum mixing."),
    Impl("soft-moe-pytorch", build_lucidrains, "soft_moe_pytorch",
         "lucidrains' port, configured num_slots=P, expert_mult=H/D, no CPU offload, not distributed. "
         "Differs: RMSNorm with learned gain on tokens and on slot embeddings (no phi l2-norm + scale), "
         "dispatches the normalised tokens, exact (erf) GELU, Dropout(0) in each expert, Python loop over experts."),
    Impl("soft-moe", build_bwconrad, "soft_moe",
         "bwconrad's port (layer file only; its package __init__ needs timm), given the same "
         "Linear/GELU-tanh/Linear expert. Differs: dispatches the normalised tokens, a four-kernel "
         "softmax, einsum mixing, Python loop over experts."),
)


def available_impls(names=None) -> list[Impl]:
    """The implementations (all, or those in `names`) whose module is installed, in IMPLS order."""
    out = []
    for impl in IMPLS:
        if names and impl.name not in names:
            continue
        if impl.module is not None and importlib.util.find_spec(impl.module) is None:
            continue
        out.append(impl)
    return out


def get_impl(name: str) -> Impl:
    for impl in IMPLS:
        if impl.name == name:
            return impl
    raise ValueError(f"implementation must be one of {[i.name for i in IMPLS]}, got {name!r}")


def build(name: str, s: Shape, seed: int = 0) -> nn.Module:
    """Implementation `name` at shape `s`, float32 weights on `s.device` (compiled if `s.compile`),
    in training mode; the same weights for every device (drawn on the CPU)."""
    torch.manual_seed(seed)
    model = get_impl(name).build(s).train().to(s.device)
    if s.compile:
        model = torch.compile(model)
    model.bench_autocast = autocast_dtype(s)
    return model


def autocast_dtype(s: Shape) -> torch.dtype | None:
    name = DTYPES[s.dtype]
    return None if name is None else getattr(torch, name)


def _autocast(model: nn.Module, x: torch.Tensor):
    dtype = getattr(model, "bench_autocast", None)
    return contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)


def make_inputs(s: Shape, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x and the output gradient dy, both (B, N, D) float32 on `s.device`, the same for every
    implementation (drawn on the CPU)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, s.tokens, s.dim, generator=g)
    dy = torch.randn(s.batch, s.tokens, s.dim, generator=g)
    return x.to(s.device), dy.to(s.device)


def forward_no_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), _autocast(model, x):
        return model(x)


def train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    for p in model.parameters():  # optimizer.zero_grad(): grads start from None every step
        p.grad = None
    xg = x.detach().requires_grad_()  # the block's LayerNorm output needs its gradient too
    with _autocast(model, x):
        y = model(xg)
    y.backward(dy.to(y.dtype))  # under autocast the output may be bf16/fp16


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
