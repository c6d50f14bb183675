"""Routers: compute routing logits in float32 (at least), whatever the autocast state.

Einsum letters: B batch, N tokens, D width, E experts, P slots per expert, S = E*P slots.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import fused
from .common import check_choice, check_positive_int, no_autocast, routing_dtype
from .fused.buffers import pool_of
from .fused.routing import FusedCombine, FusedSoftRouting
from .functional import combine_slots, dispatch_tokens, l2_normalize, soft_combine, soft_dispatch, soft_logits

WEIGHT_MODES = ("soft", "uniform", "identity")

# Flax's truncated-normal initialisers divide by this to keep the requested std after the
# truncation at +-2 standard deviations.
_TRUNC_STD_CORRECTION = 0.87962566103423978


class SoftRouter(nn.Module):
    """Soft MoE's router: the logits `scale * <l2norm(x_n), l2norm(phi[:, e, p])>`, the two
    softmaxes, and the two mixing steps (tokens -> slots, slot outputs -> tokens).

    Parameters: `phi` (D, E, P) (vmoe's `mu`), `scale` () initialised to 1.

      forward(x (B, N, D)) -> logits (B, N, S) in routing dtype (float32 or float64)
      dispatch(x, mask, noise) -> slots (E, P*B, D), routing (the weights, for `combine`)
      combine(ys (E, P*B, D), routing) -> y (B, N, D)

    dispatch, combine: "soft" (the paper), "uniform" (Table 2 ablations: every slot is the
    mean of the tokens / every token the mean of the slot outputs) or "identity" (token i ->
    slot i; needs N == E*P).
    impl: "fused" (default): the soft/soft routing through `softmoe.layers.fused.routing`
    (hand-written backwards, its own buffer pool) wherever that applies; "reference": the
    steps of `softmoe.layers.functional` in plain autograd.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = True,
                 dispatch: str = "soft", combine: str = "soft", impl: str = "fused") -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        # normalize=False is the paper's Algorithm 1 without the l2 normalisation (it matters
        # only for very wide models); kept for ablations.
        self.normalize = normalize
        self.dispatch_mode = check_choice("dispatch", dispatch, WEIGHT_MODES)
        self.combine_mode = check_choice("combine", combine, WEIGHT_MODES)
        self.impl = fused.check_impl(impl)
        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def reset_parameters(self) -> None:
        if self.phi.is_meta:
            return
        # lecun_normal with fan_in = D*E (docs/design.md §1), as Flax samples it.
        std = 1.0 / math.sqrt(self.dim * self.num_experts) / _TRUNC_STD_CORRECTION
        with torch.no_grad():
            nn.init.trunc_normal_(self.phi, mean=0.0, std=std, a=-2 * std, b=2 * std)
            self.scale.fill_(1.0)

    def slot_weights(self, dtype: torch.dtype) -> torch.Tensor:
        """`scale * l2_normalize(phi)` as (D, S) in `dtype` (call with autocast disabled).
        Folding the scale into phi is cheaper than scaling the (B, N, S) logits."""
        phi = self.phi.to(dtype).reshape(self.dim, -1)  # (D, S)
        if self.normalize:
            phi = l2_normalize(phi, dim=0)
        return phi * self.scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = routing_dtype(x.dtype)
        with no_autocast(x.device.type):
            return soft_logits(x.to(dtype), self.slot_weights(dtype), self.normalize)[0]  # (B, N, S)

    def weights(self, x: torch.Tensor, mask: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """Dispatch and combine weights, each (B, N, S) in routing dtype (float32+), of x
        (B, N, D); `noise` (B, N, S) | None is added to the logits (training noise)."""
        B, N, _ = x.shape
        S = self.num_slots
        modes = (self.dispatch_mode, self.combine_mode)
        if "identity" in modes and N != S:
            raise ValueError(f"identity routing needs tokens == num_experts*slots_per_expert = {S}, got {N} tokens")
        logits = None
        if "soft" in modes:
            logits = self(x)  # (B, N, S)
            if noise is not None:
                logits = logits + noise
        dtype = logits.dtype if logits is not None else routing_dtype(x.dtype)
        m = None if mask is None else mask.unsqueeze(-1)  # (B, N, 1)
        if self.dispatch_mode == "soft":
            dispatch = soft_dispatch(logits, m)
        else:
            dispatch = ABLATIONS[self.dispatch_mode, "dispatch"]((B, N, S), m, dtype, x.device)
        if self.combine_mode == "soft":
            combine = soft_combine(logits, m)
        else:
            combine = ABLATIONS[self.combine_mode, "combine"]((B, N, S), m, dtype, x.device)
        return dispatch, combine

    def dispatch(self, x: torch.Tensor, mask: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """Slots (E, P*B, D) of x (B, N, D) (slot-major, see `softmoe.layers.functional`) and the
        routing of this forward (`SoftRouting`: the dispatch and combine weights, (B, N, S))."""
        if self.dispatch_mode == self.combine_mode == "soft" and fused.applies(self, x):
            pool = pool_of(self) if fused.records_graph(x, self) else None
            slots, dispatch, combine = FusedSoftRouting.apply(
                x, self.slot_weights(x.dtype), mask, noise, self.normalize, self.num_experts,
                self.slots_per_expert, pool)
            return slots, SoftRouting(dispatch, combine, True, pool)
        dispatch, combine = self.weights(x, mask, noise)
        return dispatch_tokens(x, dispatch, self.num_experts), SoftRouting(dispatch, combine, False, None)

    def combine(self, ys: torch.Tensor, routing: SoftRouting) -> torch.Tensor:
        """y (B, N, D) from the expert outputs ys (E, P*B, D) and this forward's `routing`."""
        if routing.fused and ys.dtype == routing.combine.dtype:
            return FusedCombine.apply(ys, routing.combine, routing.pool)
        return combine_slots(ys, routing.combine)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.normalize}, dispatch={self.dispatch_mode!r}, combine={self.combine_mode!r}, "
                f"impl={self.impl!r}")


class SoftRouting(NamedTuple):
    """One forward's routing: the dispatch and combine weights (B, N, S) (the combine weights
    carry gradients into `SoftRouter.combine`), whether the fused path made them, and its pool."""
    dispatch: torch.Tensor
    combine: torch.Tensor
    fused: bool
    pool: object


# -- Table 2 ablations: fixed (B, N, S) weights; m (B, N, 1) bool | None ------------------------
def uniform_dispatch(shape, m, dtype, device) -> torch.Tensor:
    """Every slot is the mean of the (real) tokens of its sequence."""
    if m is None:
        return torch.full((1, 1, 1), 1.0 / shape[1], dtype=dtype, device=device).expand(shape)
    mf = m.to(dtype)
    return (mf / mf.sum(1, keepdim=True).clamp_min(1)).expand(shape)


def uniform_combine(shape, m, dtype, device) -> torch.Tensor:
    """Every (real) token is the mean of the S slot outputs."""
    combine = torch.full((1, 1, 1), 1.0 / shape[2], dtype=dtype, device=device).expand(shape)
    return combine if m is None else combine * m


def identity_weights(shape, m, dtype, device) -> torch.Tensor:
    """Token i <-> slot i (N == S); masked tokens get zero weight."""
    B, N, S = shape
    eye = torch.eye(N, S, dtype=dtype, device=device).expand(B, N, S)
    return eye if m is None else eye * m


ABLATIONS = {("uniform", "dispatch"): uniform_dispatch, ("uniform", "combine"): uniform_combine,
             ("identity", "dispatch"): identity_weights, ("identity", "combine"): identity_weights}


class Gate(nn.Module):
    """The sparse baselines' gating layer: `logits = x @ W` (D, E), no bias, float32."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.weight = nn.Parameter(torch.empty(dim, num_experts))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        # Flax nn.Dense default kernel init: lecun_normal (truncated), fan_in = D.
        std = 1.0 / math.sqrt(self.dim) / _TRUNC_STD_CORRECTION
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = routing_dtype(x.dtype)
        with no_autocast(x.device.type):
            return torch.matmul(x.to(dtype), self.weight.to(dtype))  # (..., E)
