"""Tokens Choice: V-MoE's top-K routing with expert capacity and Batch Priority Routing
(docs/design.md §2; vmoe `NoisyTopExpertsPerItemRouter` + `get_top_experts_per_item_dispatcher`).

Einsum letters: B batch, N tokens, G sequences per group, R = B/G groups, T = G*N tokens per
group, K choices per token, D width, E experts, C capacity per expert per group, L = K*T
choices per group.

Dispatch is index-based (scatter into an (R, E*C + 1, D) buffer whose last row is a sink for
dropped choices), not vmoe's dense one-hot (R, T, E, C) tensors: same result, O(L*D) memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import check_choice, check_nonneg_float, check_positive_int, cv_squared
from .sparse import SparseMoE, add_to_tokens, check_capacity, gather_tokens


def positions_in_expert(expert: torch.Tensor, num_bins: int) -> torch.Tensor:
    """For choices listed in priority order, each choice's 0-based position in its expert's
    queue: the number of earlier choices (same row) that picked the same expert.
    expert: (R, L) int64 in [0, num_bins) -> (R, L) int64."""
    R, L = expert.shape
    sorted_e, perm = torch.sort(expert, dim=1, stable=True)  # keeps priority order inside an expert
    counts = torch.zeros(R, num_bins, dtype=torch.long, device=expert.device)
    counts.scatter_add_(1, expert, torch.ones_like(expert))
    starts = counts.cumsum(1) - counts  # (R, num_bins) first index of each expert's run
    rank = torch.arange(L, device=expert.device).expand(R, L) - starts.gather(1, sorted_e)
    return torch.empty_like(expert).scatter_(1, perm, rank)


class TokensChoiceMoE(SparseMoE):
    """Each token picks its top-K experts; each expert takes at most C tokens per group.

    Args:
      dim, num_experts, hidden_dim: as SoftMoE.
      k: experts per token (1 <= k <= num_experts).
      capacity_factor: C = ceil(k * T * capacity_factor / E) (or round, `capacity_rounding`),
        then rounded up to a multiple of `capacity_multiple_of` (4, as vmoe; 1 or None = off).
        V-MoE trains with 1.05 and fine-tunes with 1.5.
      capacity: give C directly instead (overrides capacity_factor).
      batch_priority: Batch Priority Routing: within one choice rank, tokens with a larger top
        gate go first (else earlier positions go first). All first choices always go before
        all second choices.
      group_size: G sequences routed together (capacity is per group); must divide the batch.
      noise_std: training noise `(noise_std / E) * N(0, 1)` on the gate logits; the noisy
        softmax is used for routing and as combine weights (not renormalised over K).
      importance_loss_weight, load_loss_weight, gshard_loss_weight: auxiliary-loss weights
        (V-MoE: 0.005, 0.005, 0). The load loss exists only with noise, in training.

    forward(x: (B, N, D), mask: (B, N) bool | None) -> (B, N, D). A dropped choice adds
    nothing (the block's residual carries the token). Masked tokens are never routed, take
    no capacity, get zero output and are left out of the auxiliary losses.
    After forward, `aux_loss` holds the weighted sum of the auxiliary losses (mean over
    groups; None in eval mode or when all weights are 0).
    """

    def __init__(self, dim: int, num_experts: int, hidden_dim: int | None = None, k: int = 1,
                 capacity_factor: float | None = 1.05, capacity: int | None = None,
                 capacity_multiple_of: int | None = 4, capacity_rounding: str = "ceil",
                 batch_priority: bool = True, group_size: int = 1, noise_std: float = 1.0,
                 importance_loss_weight: float = 0.005, load_loss_weight: float = 0.005,
                 gshard_loss_weight: float = 0.0, expert_init: str = "identical",
                 check_finite: bool = False, impl: str = "fused") -> None:
        super().__init__(dim, num_experts, hidden_dim, group_size, noise_std, expert_init, check_finite, impl)
        check_positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        self.k = k
        check_capacity(capacity, capacity_factor)
        self.capacity = capacity
        self.capacity_factor = capacity_factor
        if capacity_multiple_of is not None:
            check_positive_int("capacity_multiple_of", capacity_multiple_of)
        self.capacity_multiple_of = capacity_multiple_of
        self.capacity_rounding = check_choice("capacity_rounding", capacity_rounding, ("ceil", "round"))
        self.batch_priority = bool(batch_priority)
        self.importance_loss_weight = check_nonneg_float("importance_loss_weight", importance_loss_weight)
        self.load_loss_weight = check_nonneg_float("load_loss_weight", load_loss_weight)
        self.gshard_loss_weight = check_nonneg_float("gshard_loss_weight", gshard_loss_weight)

    def capacity_for(self, tokens_per_group: int) -> int:
        """C for a group of T tokens (vmoe `compute_capacity`)."""
        if self.capacity is not None:
            return self.capacity
        raw = self.k * tokens_per_group * self.capacity_factor / self.num_experts
        c = math.ceil(raw) if self.capacity_rounding == "ceil" else round(raw)
        if c < 1:
            raise ValueError(f"capacity_factor={self.capacity_factor} gives capacity {c} < 1 for "
                             f"{tokens_per_group} tokens per group and {self.num_experts} experts; raise it")
        if self.capacity_multiple_of:
            c += (-c) % self.capacity_multiple_of
        return c

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        xg, mg = self._group(x, mask)  # (R, T, D), (R, T)
        R, T, D = xg.shape
        E, K = self.num_experts, self.k
        C = self.capacity_for(T)
        # 1. gating: softmax over experts (the noisy one routes and weighs, when training)
        logits, noisy, noise_sd = self._gate_logits(xg)  # (R, T, E)
        gates_clean = torch.softmax(logits, dim=-1)
        gates = gates_clean if noisy is None else torch.softmax(noisy, dim=-1)
        # 2. top-K and priority: L = K*T choices per group, in the order they claim capacity
        token, expert, gate, order = self._choices_by_priority(gates, mg)  # (R, L) each; order (R, T)
        # 3. capacity: an expert keeps its first C choices; the rest go to a drop sink
        pos = positions_in_expert(expert, E + 1)  # (R, L)
        keep = (pos < C) & (expert < E)
        row = torch.where(keep, expert * C + pos, E * C)  # (R, L) buffer row; E*C is the sink
        # 4. scatter each kept choice's token into its expert's (C, D) buffer
        buf = add_to_tokens(gather_tokens(xg, token), row, E * C + 1)  # (R, E*C+1, D)
        # 5. experts
        out = self._run_experts(buf[:, : E * C].view(R, E, C, D)).reshape(R, E * C, D)
        out = torch.cat([out, out.new_zeros(R, 1, D)], dim=1)  # (R, E*C+1, D), sink outputs 0
        # 6. gather each choice's output, weigh it by its gate, sum into its token
        w = (gate * keep).to(out.dtype)  # (R, L); dropped choices add nothing
        y = add_to_tokens(gather_tokens(out, row) * w.unsqueeze(-1), token, T)  # (R, T, D)

        aux_loss, losses = self._aux_losses(logits, noisy, noise_sd, gates_clean, gates, mg)
        B, N = x.shape[:2]

        def in_token_order(a):  # (R, L) in priority order -> (B, N, K)
            return _to_token_order(a.view(R, K, T), order).reshape(B, N, K)

        def weights():
            return {"expert_index": in_token_order(expert), "position": in_token_order(pos),
                    "kept": in_token_order(keep), "combine": in_token_order(w.detach()),
                    "gates": gates.detach().reshape(B, N, E)}

        self.publish(aux_loss, lambda: self._metrics(losses, keep, expert, mg, C), weights)
        return y.reshape(x.shape)

    def _choices_by_priority(self, gates: torch.Tensor, mg: torch.Tensor | None):
        """The K*T choices of each group (R, L), rank-major (all first choices, then all second
        choices...) and, within a rank, tokens by priority (Batch Priority Routing: larger top
        gate first; else position): token index, expert (E for masked tokens: a sink bin),
        gate value; and the priority order of the tokens (R, T)."""
        R, T, _ = gates.shape
        K = self.k
        top_v, top_i = gates.topk(K, dim=-1)  # (R, T, K)
        if self.batch_priority:
            order = torch.argsort(top_v[..., 0], dim=1, descending=True, stable=True)  # (R, T)
        else:
            order = torch.arange(T, device=gates.device).expand(R, T)
        by_prio = order.unsqueeze(-1).expand(R, T, K)
        expert = top_i.gather(1, by_prio).transpose(1, 2)  # (R, K, T)
        gate = top_v.gather(1, by_prio).transpose(1, 2)  # (R, K, T)
        if mg is not None:
            expert = torch.where(mg.gather(1, order).unsqueeze(1), expert, self.num_experts)
        return order.repeat(1, K), expert.reshape(R, K * T), gate.reshape(R, K * T), order

    def _aux_losses(self, logits, noisy, noise_sd, gates_clean, gates, mg):
        """Per-group V-MoE auxiliary losses (each (R,)), their weighted sum averaged over
        groups (None if nothing applies), and the dict of unweighted group means."""
        E = self.num_experts
        wt = None if mg is None else mg.unsqueeze(-1).to(gates.dtype)  # (R, T, 1)
        n_tok = gates.shape[1] if mg is None else wt.sum(1).clamp_min(1)  # T or (R, 1): no host-to-device copy
        losses: dict[str, torch.Tensor] = {}
        g = gates_clean if wt is None else gates_clean * wt
        losses["importance_loss"] = cv_squared(g.sum(1))  # (R,)
        if noisy is not None:
            threshold = noisy.topk(self.k, dim=-1).values[..., -1:]  # (R, T, 1) k-th largest noisy logit
            p = 0.5 * torch.erfc((threshold - logits) / noise_sd / math.sqrt(2.0))  # 1 - Phi(z)
            if wt is not None:
                p = p * wt
            losses["load_loss"] = cv_squared(p.sum(1) / n_tok)
        g = gates if wt is None else gates * wt
        top1 = F.one_hot(gates.argmax(-1), E).to(gates.dtype)
        if wt is not None:
            top1 = top1 * wt
        losses["gshard_loss"] = (top1.sum(1) / n_tok * (g.sum(1) / n_tok)).mean(-1) * E**2
        weights = {"importance_loss": self.importance_loss_weight, "load_loss": self.load_loss_weight,
                   "gshard_loss": self.gshard_loss_weight}
        terms = [weights[name] * v for name, v in losses.items() if weights[name] > 0]
        total = torch.stack(terms).sum(0).mean() if terms and self.training else None
        return total, {name: v.mean() for name, v in losses.items()}

    @torch.no_grad()
    def _metrics(self, losses, keep, expert, mg, C):
        valid = expert < self.num_experts  # (R, L)
        n_valid = valid.sum().clamp_min(1)
        R, L = keep.shape
        kept_per_token = keep.view(R, self.k, -1).sum(1)  # (R, T)
        tok_valid = torch.ones_like(kept_per_token, dtype=torch.bool) if mg is None else mg
        out = {k: v.detach() for k, v in losses.items()}
        out["dropped_choices_fraction"] = 1.0 - keep.sum() / n_valid
        out["tokens_unprocessed_fraction"] = ((kept_per_token == 0) & tok_valid).sum() / tok_valid.sum().clamp_min(1)
        out["capacity"] = keep.new_full((), float(C), dtype=torch.float32)  # a fill, no host-to-device copy
        return out


def _to_token_order(a: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """(R, K, T) in priority order -> (R, T, K) in token order."""
    R, K, T = a.shape
    return torch.empty_like(a).scatter_(2, order.unsqueeze(1).expand(R, K, T), a).transpose(1, 2)
