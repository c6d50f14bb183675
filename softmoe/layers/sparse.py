"""What the two sparse baselines (Tokens Choice, Experts Choice) share: the gating layer
with training noise, routing groups of G sequences, and the experts module.

Einsum letters: B batch, N tokens per sequence, G sequences per group, R = B/G groups,
T = G*N tokens per group, D width, E experts, C capacity (items per expert per group).
"""
from __future__ import annotations

import torch

from .common import MoELayer, check_input, check_nonneg_float, check_positive_int
from .experts import Experts
from .router import Gate


class SparseMoE(MoELayer):
    def __init__(self, dim: int, num_experts: int, hidden_dim: int | None, group_size: int, noise_std: float,
                 expert_init: str, check_finite: bool) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        check_positive_int("hidden_dim", hidden_dim)
        self.group_size = check_positive_int("group_size", group_size)
        self.noise_std = check_nonneg_float("noise_std", noise_std)
        self.check_finite = check_finite
        self.gate = Gate(dim, num_experts)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init)

    def _group(self, x: torch.Tensor, mask: torch.Tensor | None):
        """(B, N, D) -> (R, T, D) and mask (R, T) | None, after validating the input."""
        check_input(x, self.dim, mask, self.check_finite)
        B, N, D = x.shape
        G = self.group_size
        if B % G:
            raise ValueError(f"group_size={G} must divide the batch size, got batch size {B}")
        xg = x.reshape(B // G, G * N, D)
        mg = None if mask is None else mask.reshape(B // G, G * N)
        return xg, mg

    def _gate_logits(self, xg: torch.Tensor):
        """Clean and (in training, noise_std > 0) noisy gate logits, (R, T, E) float32+.
        The noise std is noise_std / E, as in V-MoE."""
        logits = self.gate(xg)
        noise_sd = self.noise_std / self.num_experts
        if self.training and noise_sd > 0:
            return logits, logits + noise_sd * torch.randn_like(logits), noise_sd
        return logits, None, noise_sd

    def _run_experts(self, buf: torch.Tensor) -> torch.Tensor:
        """(R, E, C, D) expert buffers -> (R, E, C, D) outputs with one batched expert call."""
        R, E, C, D = buf.shape
        ys = self.experts(buf.transpose(0, 1).reshape(E, R * C, D))  # (E, R*C, D)
        return ys.view(E, R, C, D).transpose(0, 1)
