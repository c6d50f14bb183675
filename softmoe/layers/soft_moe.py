"""The Soft MoE layer (Puigcerver et al., ICLR 2024), exactly as vmoe's `SoftRouter` +
`SoftMoE` (docs/design.md §1).

Einsum letters: B batch (one routing group per sequence), N tokens, D width, E experts,
P slots per expert, S = E*P slots, H expert hidden width.

    logits  = router(x)                      # (B, N, S), float32
    Dw      = softmax(logits, over N)        # (B, N, S)  one distribution per slot
    Cw      = softmax(logits, over S)        # (B, N, S)  one distribution per token
    slots   = Dw^T x                         # (B, S, D)  from the UN-normalised x
    ys      = experts(slots as (E, P*B, D))  # (E, P*B, D)
    y       = Cw ys                          # (B, N, D)

Slots are stored slot-major, (S, B, D) = (E, P*B, D): expert e's items are its P slots of
every sequence, item p*B + b being slot (e, p) of sequence b. In that layout the expert input
and output are contiguous and the (B, S, D) views the dispatch and combine matmuls need are
strided views of the same memory, so no copy is made between the three steps.
"""
from __future__ import annotations

import torch

from . import fused
from .common import MoELayer, check_choice, check_input, check_nonneg_float, check_positive_int
from .experts import Experts
from .router import SoftRouter

WEIGHT_MODES = ("soft", "uniform", "identity")


class SoftMoE(MoELayer):
    """Soft MoE: a drop-in replacement for a transformer MLP.

    Args:
      dim: model width D.
      num_experts: E.
      slots_per_expert: P (the paper uses 1; the slot count does not change with N).
      hidden_dim: expert hidden width H (default 4*dim, the ViT MLP ratio).
      noise_std: std of Gaussian noise added to the logits in training only (default 0, as
        every paper run).
      dispatch, combine: "soft" (the paper), "uniform" (Table 2 ablations: every slot is the
        mean of the tokens / every token the mean of the slot outputs) or "identity" (token i
        -> slot i; needs N == E*P).
      expert_init: "identical" (vmoe) or "distinct", see `Experts`.
      normalize: l2-normalise tokens and phi before the logits (the official code: True).
      impl: "fused" (default): the same function, faster, through `softmoe.layers.fused`
        wherever that applies (soft dispatch and combine; first-order gradients only; see
        there), else the code below; "reference": always the code below (plain autograd;
        double backward works). Passed on to the experts.

    forward(x: (B, N, D), mask: (B, N) bool | None) -> (B, N, D)

    Padding mask (True = real token): masked tokens get exactly zero dispatch weight, so
    slots are convex combinations of real tokens only, and a zero output. A sequence whose
    tokens are all masked gets all-zero slots, zero output and zero gradient; it never
    produces NaN. An empty batch (B = 0) gives an empty output.

    NaN/Inf: like any MLP, a non-finite token propagates (through the softmax over N it
    reaches every output token of its own sequence, never other sequences); this holds for
    masked positions too (0 * NaN = NaN), so fill padding with finite values. Set
    `check_finite=True` for an explicit ValueError instead (a data-dependent check; off by
    default to keep the hot path free of device syncs).
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None,
                 noise_std: float = 0.0, dispatch: str = "soft", combine: str = "soft",
                 expert_init: str = "identical", normalize: bool = True, check_finite: bool = False,
                 impl: str = "fused") -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        check_positive_int("hidden_dim", hidden_dim)
        self.noise_std = check_nonneg_float("noise_std", noise_std)
        self.dispatch = check_choice("dispatch", dispatch, WEIGHT_MODES)
        self.combine = check_choice("combine", combine, WEIGHT_MODES)
        self.check_finite = check_finite
        self.impl = fused.check_impl(impl)
        self.num_slots = num_experts * slots_per_expert
        self.router = SoftRouter(dim, num_experts, slots_per_expert, normalize=normalize)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init, impl=impl)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.dim, mask, self.check_finite, dtype=self.router.phi.dtype)
        if self.dispatch == self.combine == "soft" and fused.applies(self, x):
            y, dispatch, combine = fused.soft_moe_forward(self, x, mask)
        else:
            dispatch, combine = self.routing_weights_for(x, mask)  # (B, N, S) each
            slots = self.dispatch_tokens(x, dispatch)  # (E, P*B, D)
            ys = self.experts(slots)  # (E, P*B, D)
            y = self.combine_slots(ys, combine)  # (B, N, D)
        B, N, _ = x.shape
        E, P = self.num_experts, self.slots_per_expert
        self.publish(None,  # Soft MoE needs no auxiliary loss
                     lambda: soft_metrics(dispatch, combine, mask),
                     lambda: {"dispatch": dispatch.detach().reshape(B, N, E, P),
                              "combine": combine.detach().reshape(B, N, E, P)})
        return y

    def routing_weights_for(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Dispatch and combine weights, each (B, N, S) in routing dtype (float32+)."""
        B, N, _ = x.shape
        S = self.num_slots
        if "identity" in (self.dispatch, self.combine) and N != S:
            raise ValueError(f"identity routing needs tokens == num_experts*slots_per_expert = {S}, got {N} tokens")
        logits = None
        if "soft" in (self.dispatch, self.combine):
            logits = self.router(x)  # (B, N, S)
            if self.training and self.noise_std > 0:
                logits = logits + self.noise_std * torch.randn_like(logits)
        dtype = logits.dtype if logits is not None else torch.promote_types(x.dtype, torch.float32)
        m = None if mask is None else mask.unsqueeze(-1)  # (B, N, 1)
        if self.dispatch == "soft":
            dispatch = soft_dispatch(logits, m)
        else:
            dispatch = ABLATIONS[self.dispatch, "dispatch"]((B, N, S), m, dtype, x.device)
        if self.combine == "soft":
            combine = soft_combine(logits, m)
        else:
            combine = ABLATIONS[self.combine, "combine"]((B, N, S), m, dtype, x.device)
        return dispatch, combine

    def dispatch_tokens(self, x: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
        """slots (E, P*B, D), item p*B + b being slot p of sequence b, from x (B, N, D) and
        dispatch weights (B, N, S)."""
        B, _, D = x.shape
        slots = torch.bmm(dispatch.to(x.dtype).transpose(1, 2), x)  # (B, S, D)
        return slots.transpose(0, 1).reshape(self.num_experts, self.slots_per_expert * B, D)

    def combine_slots(self, ys: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """y (B, N, D) from expert outputs (E, P*B, D) and combine weights (B, N, S)."""
        B, _, S = combine.shape
        return torch.bmm(combine.to(ys.dtype), slot_view(ys, B, S))  # (B, N, D)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"noise_std={self.noise_std}, dispatch={self.dispatch!r}, combine={self.combine!r}, "
                f"impl={self.impl!r}")


# -- the paper's routing weights -----------------------------------------------------------------
def soft_dispatch(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the N tokens (dim 1) of logits (B, N, S); masked tokens (m: (B, N, 1)
    bool) get exact zeros, and an all-masked sequence no weight at all."""
    dl = logits if m is None else logits.masked_fill(~m, torch.finfo(logits.dtype).min)
    dispatch = torch.softmax(dl, dim=1)
    return dispatch if m is None else dispatch * m


def soft_combine(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over all E*P slots jointly (last dim) of logits (B, N, S); masked tokens get
    all-zero rows, so they output exactly zero."""
    combine = torch.softmax(logits, dim=-1)
    return combine if m is None else combine * m


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


def slot_view(slots: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """The (B, S, D) view (strided, no copy) of slot-major (E, P*B, D) slots; a copy only when
    `slots` is not contiguous (an experts module, e.g. a wrapper, may hand those back)."""
    return slots.reshape(S, B, slots.shape[2]).transpose(0, 1)


@torch.no_grad()
def soft_metrics(dispatch: torch.Tensor, combine: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """vmoe's SoftRouter metrics: mean over tokens of the min/max combine weight, mean over
    slots of the min/max dispatch weight. Masked tokens are left out of both."""
    if mask is None:
        return {
            "combine_weights_min_mean": combine.amin(-1).mean(),
            "combine_weights_max_mean": combine.amax(-1).mean(),
            "dispatch_weights_min_mean": dispatch.amin(1).mean(),
            "dispatch_weights_max_mean": dispatch.amax(1).mean(),
        }
    m = mask.unsqueeze(-1)
    tok = mask.to(combine.dtype)
    n_tok = tok.sum().clamp_min(1)
    seq_valid = mask.any(1)  # (B,) sequences with a real token
    n_slots = (seq_valid.to(combine.dtype).sum() * dispatch.shape[-1]).clamp_min(1)
    big = torch.finfo(dispatch.dtype).max
    dmin = dispatch.masked_fill(~m, big).amin(1) * seq_valid.unsqueeze(-1)
    dmax = dispatch.masked_fill(~m, 0).amax(1)
    return {
        "combine_weights_min_mean": (combine.amin(-1) * tok).sum() / n_tok,
        "combine_weights_max_mean": (combine.amax(-1) * tok).sum() / n_tok,
        "dispatch_weights_min_mean": dmin.sum() / n_slots,
        "dispatch_weights_max_mean": dmax.sum() / n_slots,
    }
