"""The Soft MoE layer (Puigcerver et al., ICLR 2024), exactly as vmoe's `SoftRouter` +
`SoftMoE` (SPEC.md §1).

Einsum letters: B batch (one routing group per sequence), N tokens, D width, E experts,
P slots per expert, S = E*P slots, H expert hidden width.

    logits  = router(x)                      # (B, N, S), float32
    Dw      = softmax(logits, over N)        # (B, N, S)  one distribution per slot
    Cw      = softmax(logits, over S)        # (B, N, S)  one distribution per token
    slots   = Dw^T x                         # (B, S, D)  from the UN-normalised x
    ys      = experts(slots as (E, B*P, D))  # (E, B*P, D)
    y       = Cw ys                          # (B, N, D)
"""
from __future__ import annotations

import torch
from torch import nn

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

    forward(x: (B, N, D), mask: (B, N) bool | None) -> (B, N, D)

    Padding mask (True = real token): masked tokens get exactly zero dispatch weight, so
    slots are convex combinations of real tokens only, and a zero output. A sequence whose
    tokens are all masked gets all-zero slots, zero output and zero gradient; it never
    produces NaN.

    NaN/Inf: like any MLP, a non-finite token propagates (through the softmax over N it
    reaches every output token of its own sequence, never other sequences). Set
    `check_finite=True` for an explicit ValueError instead (a data-dependent check; off by
    default to keep the hot path free of device syncs).
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None,
                 noise_std: float = 0.0, dispatch: str = "soft", combine: str = "soft",
                 expert_init: str = "identical", normalize: bool = True, check_finite: bool = False) -> None:
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
        self.num_slots = num_experts * slots_per_expert
        self.router = SoftRouter(dim, num_experts, slots_per_expert, normalize=normalize)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init)

    # -- routing -------------------------------------------------------------------------
    def routing_weights_for(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Dispatch and combine weights, each (B, N, S) in routing dtype (float32+)."""
        B, N, _ = x.shape
        S = self.num_slots
        needs_logits = "soft" in (self.dispatch, self.combine)
        logits = self.router(x) if needs_logits else None  # (B, N, S)
        if logits is not None and self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        dtype = logits.dtype if logits is not None else torch.promote_types(x.dtype, torch.float32)
        if "identity" in (self.dispatch, self.combine) and N != S:
            raise ValueError(f"identity routing needs tokens == num_experts*slots_per_expert = {S}, got {N} tokens")
        m = None if mask is None else mask.unsqueeze(-1)  # (B, N, 1)

        if self.dispatch == "soft":
            dl = logits if m is None else logits.masked_fill(~m, torch.finfo(dtype).min)
            dispatch = torch.softmax(dl, dim=1)  # over tokens
            if m is not None:
                dispatch = dispatch * m  # exact zeros, and no weight at all for all-masked rows
        elif self.dispatch == "uniform":
            if m is None:
                dispatch = x.new_full((1, 1, 1), 1.0 / N, dtype=dtype).expand(B, N, S)
            else:
                mf = m.to(dtype)
                dispatch = (mf / mf.sum(1, keepdim=True).clamp_min(1)).expand(B, N, S)
        else:
            dispatch = torch.eye(N, dtype=dtype, device=x.device).expand(B, N, S)
            if m is not None:
                dispatch = dispatch * m

        if self.combine == "soft":
            combine = torch.softmax(logits, dim=-1)  # over all E*P slots jointly
        elif self.combine == "uniform":
            combine = x.new_full((1, 1, 1), 1.0 / S, dtype=dtype).expand(B, N, S)
        else:
            combine = torch.eye(N, dtype=dtype, device=x.device).expand(B, N, S)
        if m is not None:
            combine = combine * m  # masked tokens output exactly zero
        return dispatch, combine

    # -- the three separable steps ---------------------------------------------------------
    def dispatch_tokens(self, x: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
        """slots (E, B*P, D) from x (B, N, D) and dispatch weights (B, N, S)."""
        B, _, D = x.shape
        E, P = self.num_experts, self.slots_per_expert
        slots = torch.bmm(dispatch.to(x.dtype).transpose(1, 2), x)  # (B, S, D)
        return slots.view(B, E, P, D).transpose(0, 1).reshape(E, B * P, D)

    def combine_slots(self, ys: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """y (B, N, D) from expert outputs (E, B*P, D) and combine weights (B, N, S)."""
        E, _, D = ys.shape
        B = combine.shape[0]
        P = self.slots_per_expert
        ys = ys.view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)  # (B, S, D)
        return torch.bmm(combine.to(ys.dtype), ys)  # (B, N, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.dim, mask, self.check_finite)
        dispatch, combine = self.routing_weights_for(x, mask)
        ys = self.experts(self.dispatch_tokens(x, dispatch))
        y = self.combine_slots(ys, combine)
        self.aux_loss = None  # Soft MoE needs no auxiliary loss.
        if self.record_metrics:
            self.metrics = _soft_metrics(dispatch, combine, mask)
        if self.record_weights:
            B, N, _ = x.shape
            E, P = self.num_experts, self.slots_per_expert
            self.routing_weights = {"dispatch": dispatch.detach().reshape(B, N, E, P),
                                    "combine": combine.detach().reshape(B, N, E, P)}
        return y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"noise_std={self.noise_std}, dispatch={self.dispatch!r}, combine={self.combine!r}")


@torch.no_grad()
def _soft_metrics(dispatch: torch.Tensor, combine: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
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
