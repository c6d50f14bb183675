"""What the two sparse baselines (Tokens Choice, Experts Choice) share: the gating layer
with training noise, routing groups of G sequences, capacity checks, the experts module,
and the gather/scatter steps between tokens and the per-expert buffers.

Einsum letters: B batch, N tokens per sequence, G sequences per group, R = B/G groups,
T = G*N tokens per group, D width, E experts, C capacity (items per expert per group),
L items routed per group.
"""
from __future__ import annotations

import torch

from . import fused
from .common import MoELayer, check_finite_positive, check_input, check_nonneg_float, check_positive_int, draw_noise
from .experts import Experts
from .router import Gate


class SparseMoE(MoELayer):
    def __init__(self, dim: int, num_experts: int, hidden_dim: int | None, group_size: int, noise_std: float,
                 expert_init: str, check_finite: bool, impl: str) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        check_positive_int("hidden_dim", hidden_dim)
        self.group_size = check_positive_int("group_size", group_size)
        self.noise_std = check_nonneg_float("noise_std", noise_std)
        self.check_finite = check_finite
        self.impl = fused.check_impl(impl)
        self.gate = Gate(dim, num_experts)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init, impl=impl)

    def _group(self, x: torch.Tensor, mask: torch.Tensor | None):
        """(B, N, D) -> (R, T, D) and mask (R, T) | None, after validating the input."""
        check_input(x, self.dim, mask, self.check_finite, dtype=self.gate.weight.dtype)
        B, N, D = x.shape
        G = self.group_size
        if B % G:
            raise ValueError(f"group_size={G} must divide the batch size, got batch size {B}")
        xg = x.reshape(B // G, G * N, D)
        mg = None if mask is None else mask.reshape(B // G, G * N)
        return xg, mg

    def _gate_logits(self, xg: torch.Tensor):
        """Clean and (in training, noise_std > 0) noisy gate logits, (R, T, E) float32+.
        The noise std is noise_std / E, as in V-MoE; the noise is drawn by `self.noise_sampler`
        (see `MoELayer`), one row per routing group of group_size sequences."""
        logits = self.gate(xg)
        noise_sd = self.noise_std / self.num_experts
        if self.training and noise_sd > 0:
            noise = draw_noise(self, tuple(logits.shape), logits.dtype, logits.device, self.group_size)  # (R, T, E)
            return logits, logits + noise_sd * noise, noise_sd
        return logits, None, noise_sd

    def _run_experts(self, buf: torch.Tensor) -> torch.Tensor:
        """(R, E, C, D) expert buffers -> (R, E, C, D) outputs with one batched expert call."""
        R, E, C, D = buf.shape
        ys = self.experts(buf.transpose(0, 1).reshape(E, R * C, D))  # (E, R*C, D)
        return ys.view(E, R, C, D).transpose(0, 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, group_size={self.group_size}, "
                f"noise_std={self.noise_std}, impl={self.impl!r}")


def check_capacity(capacity, capacity_factor) -> None:
    """A capacity C (int >= 1) or, without one, a finite capacity_factor > 0."""
    if capacity is not None:
        check_positive_int("capacity", capacity)
    elif capacity_factor is None:
        raise ValueError("capacity_factor must be a finite number > 0 (or give capacity), got None")
    else:
        check_finite_positive("capacity_factor", capacity_factor)


def gather_tokens(xg: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """xg (R, T, D) rows at token (R, L) -> (R, L, D)."""
    R, L = token.shape
    return xg.gather(1, token.unsqueeze(-1).expand(R, L, xg.shape[2]))


def add_to_tokens(values: torch.Tensor, token: torch.Tensor, T: int) -> torch.Tensor:
    """Sum values (R, L, D) into their tokens (R, L) of a zero (R, T, D) output."""
    R, L, D = values.shape
    return values.new_zeros(R, T, D).scatter_add_(1, token.unsqueeze(-1).expand(R, L, D), values)
