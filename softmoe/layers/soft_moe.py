"""The Soft MoE layer (Puigcerver et al., ICLR 2024), exactly as vmoe's `SoftRouter` +
`SoftMoE` (docs/design.md §1): the router and the experts, composed.

Einsum letters: B batch (one routing group per sequence), N tokens, D width, E experts,
P slots per expert, S = E*P slots, H expert hidden width.

    logits  = router(x)                      # (B, N, S), float32
    Dw      = softmax(logits, over N)        # (B, N, S)  one distribution per slot
    Cw      = softmax(logits, over S)        # (B, N, S)  one distribution per token
    slots   = Dw^T x                         # (E, P*B, D) from the UN-normalised x  } router.dispatch
    ys      = experts(slots)                 # (E, P*B, D)                            experts
    y       = Cw ys                          # (B, N, D)                              router.combine

Each component owns its fast path (`impl="fused"`): the router's routing and mixing, the
experts' MLP. The layer calls them and never looks inside either, so any experts module
with the (E, M, D) -> (E, M, D) contract (a subclass, a converted timm MLP, a sharded one)
is run as it is. Slots are slot-major (see softmoe/layers/functional.py).
"""
from __future__ import annotations

import torch

from . import fused
from .common import MoELayer, check_input, check_nonneg_float, check_positive_int, draw_noise, routing_dtype
from .experts import Experts
from .router import WEIGHT_MODES, SoftRouter

__all__ = ["SoftMoE", "soft_metrics", "WEIGHT_MODES"]


class SoftMoE(MoELayer):
    """Soft MoE: a drop-in replacement for a transformer MLP.

    Args:
      dim: model width D.
      num_experts: E.
      slots_per_expert: P (the paper uses 1; the slot count does not change with N).
      hidden_dim: expert hidden width H (default 4*dim, the ViT MLP ratio).
      noise_std: std of Gaussian noise added to the logits in training only (default 0, as
        every paper run); drawn by `self.noise_sampler` (see `MoELayer`), one row per sequence.
      dispatch, combine: "soft" (the paper), "uniform" (Table 2 ablations: every slot is the
        mean of the tokens / every token the mean of the slot outputs) or "identity" (token i
        -> slot i; needs N == E*P).
      expert_init: "identical" (vmoe) or "distinct", see `Experts`.
      normalize: l2-normalise tokens and phi before the logits (the official code: True).
      impl: "fused" (default): the same function, faster, through the router's and the
        experts' fast paths (`softmoe.layers.fused`) wherever each applies (first-order
        gradients only); "reference": plain autograd through softmoe/layers/functional.py
        (double backward works). Passed on to the router and the experts.
      logits_dtype: "float32" (default: all of the routing in float32, as the paper's code)
        or "autocast" (under autocast, the logits matmul's operands in the autocast dtype;
        softmaxes and routing weights stay float32); see `SoftRouter` and docs/design.md §1.3.

    Precision (docs/design.md §1.3): under bf16/fp16 autocast the routing (normalisation,
    logits, both softmaxes, both mixing matmuls) runs in float32 and the experts in the
    autocast dtype; the output has the autocast dtype. Both impls compute it so.

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
                 impl: str = "fused", logits_dtype: str = "float32") -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        check_positive_int("hidden_dim", hidden_dim)
        self.noise_std = check_nonneg_float("noise_std", noise_std)
        self.check_finite = check_finite
        self.impl = fused.check_impl(impl)
        self.num_slots = num_experts * slots_per_expert
        self.router = SoftRouter(dim, num_experts, slots_per_expert, normalize=normalize, dispatch=dispatch,
                                 combine=combine, impl=impl, logits_dtype=logits_dtype)
        self.dispatch, self.combine = self.router.dispatch_mode, self.router.combine_mode
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init, impl=impl)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.dim, mask, self.check_finite, dtype=self.router.phi.dtype)
        B, N, _ = x.shape
        E, P, S = self.num_experts, self.slots_per_expert, self.num_slots
        noise = None
        if self.training and self.noise_std > 0:  # training noise on the logits, in routing dtype
            noise = self.noise_std * draw_noise(self, (B, N, S), routing_dtype(x.dtype), x.device)  # (B, N, S)
        slots, routing = self.router.dispatch(x, mask, noise)  # (E, P*B, D)
        ys = self.experts(slots)  # (E, P*B, D)
        y = self.router.combine(ys, routing)  # (B, N, D)
        dispatch, combine = routing.dispatch, routing.combine  # (B, N, S) each
        self.publish(None,  # Soft MoE needs no auxiliary loss
                     lambda: soft_metrics(dispatch, combine, mask),
                     lambda: {"dispatch": dispatch.detach().reshape(B, N, E, P),
                              "combine": combine.detach().reshape(B, N, E, P)})
        return y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"noise_std={self.noise_std}, dispatch={self.dispatch!r}, combine={self.combine!r}, "
                f"impl={self.impl!r}")


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
