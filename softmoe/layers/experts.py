"""E expert MLPs as one stacked weight set, applied with two batched matmuls.

Einsum letters: E experts, M items per expert (slots or capacity buffer), D model width,
H expert hidden width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .common import check_choice, check_positive_int

EXPERT_INITS = ("identical", "distinct")


class Experts(nn.Module):
    """`y[e] = W2_e gelu_tanh(W1_e x[e] + b1_e) + b2_e` for every expert e at once.

    Parameters (named as the official checkpoints' layout, transposed to (in, out)):
      w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).

    forward(x: (E, M, D)) -> (E, M, D). Expert parallelism wraps or replaces this module;
    routing code never looks inside it.

    expert_init:
      "identical" (vmoe's default, `split_rngs=False`): every expert starts from the same
        xavier-uniform kernels; routing differences break the symmetry during training.
      "distinct": each expert's kernels drawn independently.

    impl: "fused" (default): the same function, faster, through `softmoe.layers.fused`
      wherever that applies (first-order gradients only; see there), else the code below;
      "reference": always the code below (plain autograd; double backward works).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, expert_init: str = "identical",
                 bias_init_std: float = 1e-6, impl: str = "fused") -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.dim = check_positive_int("dim", dim)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.expert_init = check_choice("expert_init", expert_init, EXPERT_INITS)
        self.bias_init_std = bias_init_std
        self.impl = fused.check_impl(impl)
        E, D, H = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(E, D, H))
        self.b1 = nn.Parameter(torch.empty(E, H))
        self.w2 = nn.Parameter(torch.empty(E, H, D))
        self.b2 = nn.Parameter(torch.empty(E, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for w in (self.w1, self.w2):
                fan_in, fan_out = w.shape[1], w.shape[2]
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform per expert
                if self.expert_init == "identical":
                    w.copy_(torch.empty_like(w[0]).uniform_(-bound, bound).expand_as(w))
                else:
                    w.uniform_(-bound, bound)
            for b in (self.b1, self.b2):
                b.normal_(0.0, self.bias_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (E, M, D) -> (E, M, D)."""
        if fused.applies(self, x):
            return fused.experts_module_forward(self, x)
        h = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)  # (E, M, H)
        h = F.gelu(h, approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (E, M, D)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"expert_init={self.expert_init!r}, impl={self.impl!r}")
