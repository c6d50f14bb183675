"""Routers: compute routing logits in float32 (at least), whatever the autocast state
(Soft MoE's `logits_dtype="autocast"` opts the logits matmul's operands into autocast's dtype).

Einsum letters: B batch, N tokens, D width, E experts, P slots per expert, S = E*P slots.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from . import fused
from .common import autocast_on, check_choice, check_positive_int, compute_dtype, no_autocast, routing_dtype
from .fused.buffers import pool_of
from .fused.routing import FusedCombine, FusedSoftRouting
from .functional import combine_slots, dispatch_tokens, l2_normalize, soft_combine, soft_dispatch, soft_logits

WEIGHT_MODES = ("soft", "uniform", "identity")
LOGITS_DTYPES = ("float32", "autocast")

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
    (hand-written backwards, its own buffer pool) wherever that applies, under bf16/fp16
    autocast too; "reference": the steps of `softmoe.layers.functional` in plain autograd.

    Precision (docs/design.md §1.3): the normalisation, the logits, both softmaxes and both
    mixing matmuls run in float32 (float64 for float64 inputs), with autocast off; the slots
    and the output are then cast to the compute dtype (autocast's under autocast, else x's).
    logits_dtype: "float32" (default) or "autocast": under autocast, the operands of the
      logits matmul `x @ phi` (B*N*D*S multiply-adds, a third of the routing's) are cast to
      the autocast dtype and the product back to float32; the normalisation factors, the
      softmaxes and the routing weights stay float32. Outside autocast it changes nothing.
      Its error against float64 is measured in docs/benchmarks.md.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = True,
                 dispatch: str = "soft", combine: str = "soft", impl: str = "fused",
                 logits_dtype: str = "float32") -> None:
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
        self.logits_dtype = check_choice("logits_dtype", logits_dtype, LOGITS_DTYPES)
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

    def logits_matmul_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The operand dtype of the logits matmul on x: autocast's with logits_dtype="autocast"
        under autocast (x not float64), else None (the routing dtype)."""
        if self.logits_dtype == "autocast" and x.dtype != torch.float64 and autocast_on(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = routing_dtype(x.dtype)
        matmul_dtype = self.logits_matmul_dtype(x)
        with no_autocast(x.device.type):
            return soft_logits(x.to(dtype), self.slot_weights(dtype), self.normalize, matmul_dtype)[0]  # (B, N, S)

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
        """Slots (E, P*B, D) of x (B, N, D) (slot-major, see `softmoe.layers.functional`) in the
        compute dtype (autocast's under autocast, else x's), and the routing of this forward
        (`SoftRouting`: the dispatch and combine weights, (B, N, S), in routing dtype). The
        mixing matmul runs in routing dtype (float32+) with autocast off."""
        out_dtype, dtype = compute_dtype(x), routing_dtype(x.dtype)
        if self.dispatch_mode == self.combine_mode == "soft" and fused.applies(self, x):
            pool = pool_of(self) if fused.records_graph(x, self) else None
            matmul_dtype = self.logits_matmul_dtype(x)
            with no_autocast(x.device.type):
                slots, dispatch, combine = FusedSoftRouting.apply(
                    x.to(dtype), self.slot_weights(dtype), mask, noise, self.normalize, self.num_experts,
                    self.slots_per_expert, pool, matmul_dtype)
            return slots.to(out_dtype), SoftRouting(dispatch, combine, True, pool, out_dtype)
        dispatch, combine = self.weights(x, mask, noise)
        with no_autocast(x.device.type):
            slots = dispatch_tokens(x, dispatch, self.num_experts)
        return slots.to(out_dtype), SoftRouting(dispatch, combine, False, None, out_dtype)

    def combine(self, ys: torch.Tensor, routing: SoftRouting) -> torch.Tensor:
        """y (B, N, D) from the expert outputs ys (E, P*B, D) and this forward's `routing`: the
        mixing matmul in routing dtype (float32+, autocast off), y in the compute dtype of the
        `dispatch` that made `routing`."""
        with no_autocast(ys.device.type):
            if routing.fused:
                y = FusedCombine.apply(ys.to(routing.combine.dtype), routing.combine, routing.pool)
            else:
                y = combine_slots(ys, routing.combine)
        return y if routing.out_dtype is None else y.to(routing.out_dtype)

    def extra_repr(self) -> str:
        logits = f", logits_dtype={self.logits_dtype!r}" if self.logits_dtype != "float32" else ""
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.normalize}, dispatch={self.dispatch_mode!r}, combine={self.combine_mode!r}, "
                f"impl={self.impl!r}{logits}")


class SoftRouting(NamedTuple):
    """One forward's routing: the dispatch and combine weights (B, N, S) (the combine weights
    carry gradients into `SoftRouter.combine`), whether the fused path made them, its pool,
    and the dtype `combine` casts its output to (None: the mixing matmul's)."""
    dispatch: torch.Tensor
    combine: torch.Tensor
    fused: bool
    pool: object
    out_dtype: torch.dtype | None = None


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
