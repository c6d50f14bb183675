"""The naive baseline: Soft MoE with one nn.Sequential per expert, applied in a Python loop."""
from __future__ import annotations

import torch
from torch import nn


def expert_mlp(dim: int, hidden: int) -> nn.Sequential:
    """One expert as the baselines build it: Linear(D, H), tanh-GELU, Linear(H, D)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class NaiveSoftMoE(nn.Module):
    """Soft MoE written the obvious way: the same math as `softmoe.SoftMoE` (l2-normalised
    logits with a learned scale, softmax over tokens / over all slots, dispatch of the
    un-normalised tokens, tanh-GELU expert MLPs), but with one `nn.Sequential` per expert
    applied in a Python loop. A benchmark baseline only.

    forward(x: (B, N, D)) -> (B, N, D)
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.phi = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / (dim * num_experts) ** 0.5)
        self.scale = nn.Parameter(torch.ones(()))
        self.experts = nn.ModuleList(expert_mlp(dim, hidden_dim) for _ in range(num_experts))

    @classmethod
    def from_soft_moe(cls, layer) -> NaiveSoftMoE:
        """A copy of `layer`'s weights (SoftMoE with soft dispatch and combine, normalize=True)."""
        ex = layer.experts
        naive = cls(layer.dim, layer.num_experts, layer.slots_per_expert, ex.hidden_dim).to(ex.w1.dtype)
        with torch.no_grad():
            naive.phi.copy_(layer.router.phi)
            naive.scale.copy_(layer.router.scale)
            for e, mlp in enumerate(naive.experts):
                mlp[0].weight.copy_(ex.w1[e].T)
                mlp[0].bias.copy_(ex.b1[e])
                mlp[2].weight.copy_(ex.w2[e].T)
                mlp[2].bias.copy_(ex.b2[e])
        return naive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # (B, N, D)
        phin = self.phi * torch.rsqrt(self.phi.pow(2).sum(0, keepdim=True) + 1e-6)  # (D, E, P)
        logits = self.scale * torch.einsum("bnd,dep->bnep", xn, phin)  # (B, N, E, P)
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        slots = torch.einsum("bnep,bnd->bepd", dispatch, x)  # (B, E, P, D)
        ys = torch.stack([mlp(slots[:, e]) for e, mlp in enumerate(self.experts)], dim=1)  # (B, E, P, D)
        return torch.einsum("bnep,bepd->bnd", combine, ys)
