"""Experts Choice (Zhou et al. 2022) as compared in the Soft MoE paper (docs/design.md §2; vmoe
`NoisyTopItemsPerExpertRouter` + `get_top_items_per_expert_dispatcher`).

Einsum letters: B batch, N tokens, G sequences per group, R = B/G groups, T = G*N tokens per
group, D width, E experts, C tokens taken by each expert per group.
"""
from __future__ import annotations

import math

import torch

from .sparse import SparseMoE, add_to_tokens, check_capacity, gather_tokens


class ExpertsChoiceMoE(SparseMoE):
    """Each expert takes its top-C tokens of the group by gate value; combine weight = gate.

    Args:
      dim, num_experts, hidden_dim, group_size, noise_std, expert_init: as TokensChoiceMoE.
      capacity_factor: C = round(T * capacity_factor / E) (multiple of 1, as in the paper's
        comparison); must give 1 <= C <= T.
      capacity: give C directly instead.
      impl: "fused" or "reference", passed on to the experts (see `Experts`).

    Every expert is filled with exactly C tokens; a token may be taken by several experts or
    by none (then only the residual carries it). No auxiliary loss (`aux_loss` is None).
    Masked tokens rank below every real token; if C exceeds the real tokens of a group, the
    extra picks are masked tokens with weight 0 (they contribute nothing).
    """

    def __init__(self, dim: int, num_experts: int, hidden_dim: int | None = None,
                 capacity_factor: float | None = 1.0, capacity: int | None = None, group_size: int = 1,
                 noise_std: float = 1.0, expert_init: str = "identical", check_finite: bool = False,
                 impl: str = "fused") -> None:
        super().__init__(dim, num_experts, hidden_dim, group_size, noise_std, expert_init, check_finite, impl)
        check_capacity(capacity, capacity_factor)
        self.capacity = capacity
        self.capacity_factor = capacity_factor

    def capacity_for(self, tokens_per_group: int) -> int:
        c = (self.capacity if self.capacity is not None
             else round(tokens_per_group * self.capacity_factor / self.num_experts))
        if not 1 <= c <= tokens_per_group:
            raise ValueError(f"capacity must be in [1, tokens per group = {tokens_per_group}], got {c} "
                             f"(capacity={self.capacity}, capacity_factor={self.capacity_factor}, "
                             f"num_experts={self.num_experts})")
        return c

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        xg, mg = self._group(x, mask)  # (R, T, D), (R, T)
        R, T, D = xg.shape
        E = self.num_experts
        C = self.capacity_for(T)
        # 1. gating: softmax over experts (noisy when training)
        logits, noisy, _ = self._gate_logits(xg)
        gates = torch.softmax(logits if noisy is None else noisy, dim=-1)  # (R, T, E)
        # 2. each expert picks its top-C tokens of the group (masked tokens rank below all)
        scores = gates.transpose(1, 2)  # (R, E, T)
        if mg is not None:
            scores = scores.masked_fill(~mg.unsqueeze(1), -1.0)  # below every gate (gates >= 0)
        top_v, top_i = scores.topk(C, dim=-1)  # (R, E, C)
        weight = top_v.clamp_min(0.0)  # masked picks -> 0
        token = top_i.reshape(R, E * C)  # (R, E*C)
        # 3. gather the picked tokens into the (E, C, D) expert buffers (exactly full: no drops)
        buf = gather_tokens(xg, token).view(R, E, C, D)
        # 4. experts, 5. weigh each output by its gate and sum into its token
        out = self._run_experts(buf) * weight.unsqueeze(-1).to(xg.dtype)  # (R, E, C, D)
        y = add_to_tokens(out.reshape(R, E * C, D), token, T)  # (R, T, D)
        B, N = x.shape[:2]
        self.publish(None, lambda: self._metrics(top_i, weight, mg, T),
                     lambda: {"token_index": top_i.detach(), "combine": weight.detach(),
                              "gates": gates.detach().reshape(B, N, E)})
        return y.reshape(x.shape)

    @torch.no_grad()
    def _metrics(self, top_i, weight, mg, T):
        """vmoe's Experts Choice metrics, averaged over groups (real tokens only)."""
        R, E, C = top_i.shape
        picked = (weight > 0) if mg is not None else torch.ones_like(top_i, dtype=torch.bool)
        per_token = torch.zeros(R, T, device=top_i.device).scatter_add_(
            1, top_i.reshape(R, -1), picked.reshape(R, -1).float())  # (R, T) experts per token
        valid = torch.ones(R, T, dtype=torch.bool, device=top_i.device) if mg is None else mg
        n = valid.sum().clamp_min(1)
        big = float(E + 1)
        out = {
            "num_experts_per_item_min": per_token.masked_fill(~valid, big).amin(1).float().mean(),
            "num_experts_per_item_max": per_token.masked_fill(~valid, -1).amax(1).float().mean(),
            "min_selected_gate": weight.masked_fill(~picked, 2.0).amin(),
            "max_selected_gate": weight.amax(),
        }
        thresholds = sorted({2**i for i in range(int(math.log2(E)) + 1)} | {E})
        for t in thresholds:
            out[f"ratio_processed_items_by_at_least_{t}_experts"] = ((per_token >= t) & valid).sum() / n
        return out
