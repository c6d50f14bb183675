"""Shared pieces of the MoE layers: argument checks, the routing-dtype rule, and the
base class through which a training loop reaches auxiliary losses and routing metrics.

Why a base class with attributes instead of returning tuples: every layer stays a drop-in
for an MLP (`forward(x) -> y`), and `collect_aux_loss(model)` / `collect_metrics(model)`
find the values of the last forward by walking the module tree; no global state.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator

import torch
from torch import nn


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    # numbers.Integral admits numpy integers; bool is excluded on purpose (True is not a size).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_nonneg_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_finite_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def autocast_on(device_type: str) -> bool:
    """`torch.is_autocast_enabled(device_type)`, False for device types without autocast (meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls on `x` compute in: autocast's (bf16/fp16) while autocast is on
    for x's device and x is a float type autocast casts (not float64), else x's own."""
    if x.dtype != torch.float64 and x.is_floating_point() and autocast_on(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def no_autocast(device_type: str):
    """A context that turns autocast off on `device_type` (a no-op where there is none)."""
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def check_input(x: torch.Tensor, dim: int, mask: torch.Tensor | None, check_finite: bool = False,
                dtype: torch.dtype | None = None) -> None:
    """Validate `x` (B, N, D) (of the parameters' `dtype` outside autocast) and `mask`
    (B, N) bool on x's device; cheap metadata checks only, unless `check_finite` asks for
    the data-dependent NaN/Inf check (a device sync)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor of shape (batch, tokens, {dim}), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, tokens, dim={dim}) (3 dims), got shape {tuple(x.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x.shape[-1] must equal dim={dim}, got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"x must have at least one token, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype and not autocast_on(x.device.type):
        raise ValueError(f"x.dtype must equal the layer's parameter dtype {dtype} outside torch.autocast, "
                         f"got {x.dtype} (convert x, or the layer with .to({x.dtype}))")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask must be a torch.bool tensor (True = real token), got {got}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must have shape (batch, tokens) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask must be on x's device {x.device}, got {mask.device}")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or Inf (check_finite=True)")


def routing_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing runs in float32 at least (float64 stays float64, for exact references)."""
    return torch.promote_types(dtype, torch.float32)


def standard_normal(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, group_size: int = 1
                    ) -> torch.Tensor:
    """The MoE layers' default `noise_sampler`: `torch.randn(shape)` from the global RNG.

    shape[0] counts routing groups of `group_size` consecutive sequences of the layer's batch
    (Soft MoE: one sequence per group); a sampler that knows which rows of a larger (global)
    batch these are uses it (softmoe.distributed.key_noise_by_global_rows); this one ignores it."""
    return torch.randn(shape, dtype=dtype, device=device)


def draw_noise(layer: MoELayer, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               group_size: int = 1) -> torch.Tensor:
    """`layer.noise_sampler(shape, dtype, device, group_size)`, checked to have `shape`."""
    noise = layer.noise_sampler(shape, dtype, device, group_size)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"{type(layer).__name__}.noise_sampler must return a tensor of shape {tuple(shape)}, "
                         f"got {tuple(noise.shape)}")
    return noise


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last axis: var / mean^2 (population var),
    as vmoe computes it (no sqrt, so the gradient is defined at zero variance).

    For the non-negative loads and importances it is applied to, a zero mean means an all-zero
    vector (a routing group whose tokens are all padding): its loss is 0 with zero gradient
    instead of 0/0 = NaN (vmoe never sees such a group)."""
    mean = v.mean(dim=-1)
    return v.var(dim=-1, unbiased=False) / torch.where(mean == 0, torch.ones_like(mean), mean.pow(2))


class MoELayer(nn.Module):
    """Base of SoftMoE, TokensChoiceMoE and ExpertsChoiceMoE.

    After each forward:
      - `aux_loss` holds the layer's weighted auxiliary loss (a 0-dim tensor; None for Soft
        MoE and Experts Choice, which need none, and in eval mode);
      - `metrics` holds routing metrics (dict of 0-dim tensors, detached) when
        `record_metrics` is True, else it is left empty (computing them costs extra passes);
      - `routing_weights` holds the dispatch/combine weights when `record_weights` is True.

    Training noise on the routing logits (layers with noise_std > 0) is drawn by
    `noise_sampler(shape, dtype, device, group_size) -> (shape) standard normal`, where
    shape[0] counts the batch's routing groups of group_size consecutive sequences. Default
    `standard_normal` (torch.randn from the global RNG); `softmoe.distributed.
    key_noise_by_global_rows` replaces it so that a rank's rows get the noise one process
    would draw for them (docs/design.md §6).

    A forward re-run by activation checkpointing (during the backward) leaves these as the
    original forward set them. A copy (`copy.deepcopy`, pickling) keeps `aux_loss` detached.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record_metrics = False
        self.record_weights = False
        self.check_finite = False
        self.aux_loss: torch.Tensor | None = None
        self.metrics: dict[str, torch.Tensor] = {}
        self.routing_weights: dict[str, torch.Tensor] = {}
        self.noise_sampler = standard_normal

    def publish(self, aux_loss: torch.Tensor | None, metrics, weights) -> None:
        """Store a forward's routing outputs: `aux_loss`, and `metrics()` / `weights()` (called
        only when recorded). Skipped when the forward is a recompute inside a backward
        (activation checkpointing), which would otherwise overwrite the original forward's
        values with tensors of a graph that is about to be freed."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # inside a backward: a checkpoint recompute
        self.aux_loss = aux_loss
        if self.record_metrics:
            self.metrics = metrics()
        if self.record_weights:
            self.routing_weights = weights()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        if state.get("aux_loss") is not None:
            state["aux_loss"] = state["aux_loss"].detach()  # a graph cannot be copied
        return state


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            yield name, module


def collect_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses of every MoE layer's last forward, a 0-dim tensor
    in routing dtype (float32, float64 for a float64 model) on the model's device; zero when
    no layer has one (no MoE layer, none has run, Soft MoE, eval mode), so that
    `loss = task_loss + collect_aux_loss(model)` always works. Add it to the training loss."""
    losses = [m.aux_loss for _, m in moe_layers(model) if m.aux_loss is not None]
    p = next(model.parameters(), None)
    dtype = torch.float32 if p is None else routing_dtype(p.dtype)
    if not losses:
        return torch.zeros((), dtype=dtype, device=None if p is None else p.device)
    return torch.stack([loss.to(dtype) for loss in losses]).sum()


def collect_metrics(model: nn.Module) -> dict[str, float]:
    """Routing metrics of the last forward of every MoE layer that recorded them, as
    `{"<module path>/<metric>": float}`. One device-to-host transfer for all of them (one
    `float()` per metric would be one host sync each)."""
    keys, values = [], []
    for name, m in moe_layers(model):
        for key, value in m.metrics.items():
            keys.append(f"{name}/{key}" if name else key)
            values.append(value)
    if not values:
        return {}
    dev = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=dev).detach().reshape(()) for v in values])
    return dict(zip(keys, stacked.tolist()))


@contextlib.contextmanager
def record_routing(model: nn.Module, metrics: bool = True, weights: bool = False):
    """Turn on metric (and optionally weight) recording in every MoE layer of `model` for the
    duration of the block: `with record_routing(model): model(x); m = collect_metrics(model)`."""
    layers = [m for _, m in moe_layers(model)]
    saved = [(m.record_metrics, m.record_weights) for m in layers]
    for m in layers:
        m.record_metrics, m.record_weights = metrics, weights
    try:
        yield layers
    finally:
        for m, (rm, rw) in zip(layers, saved):
            m.record_metrics, m.record_weights = rm, rw
