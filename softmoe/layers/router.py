"""Routers: compute routing logits in float32 (at least), whatever the autocast state.

Einsum letters: B batch, N tokens, D width, E experts, P slots per expert, S = E*P slots.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import check_positive_int, no_autocast, routing_dtype

# Flax's truncated-normal initialisers divide by this to keep the requested std after the
# truncation at +-2 standard deviations.
_TRUNC_STD_CORRECTION = 0.87962566103423978


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(sum(x**2) + eps)`: the eps sits inside the rsqrt, as in vmoe."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


def soft_logits(x: torch.Tensor, w: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits = rsqrt(|x|^2 + 1e-6) * (x @ w)` (B, N, S) and that factor r (B, N, 1) (None
    without normalisation), for x (B, N, D) and slot weights w (D, S) in one dtype.

    Algebraically `l2_normalize(x) @ w`, but the per-token factor is applied to the (B, N, S)
    logits instead of materialising a normalised copy of x (B, N, D), and |x|^2 comes from
    one fused reduction (vector_norm) instead of a squared copy of x."""
    logits = torch.matmul(x, w)  # (B, N, S)
    if not normalize:
        return logits, None
    r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + 1e-6)  # (B, N, 1)
    return logits * r, r


class SoftRouter(nn.Module):
    """Soft MoE logits: `scale * <l2norm(x_n), l2norm(phi[:, e, p])>`.

    Parameters: `phi` (D, E, P) (vmoe's `mu`), `scale` () initialised to 1.
    forward(x: (B, N, D)) -> logits (B, N, S) in routing dtype (float32 or float64).
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = True) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        # normalize=False is the paper's Algorithm 1 without the l2 normalisation (it matters
        # only for very wide models); kept for ablations.
        self.normalize = normalize
        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        self.reset_parameters()

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
