"""E expert MLPs as one stacked weight set, applied with two batched matmuls.

Einsum letters: E experts, M items per expert (slots or capacity buffer), D model width,
H expert hidden width.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import fused
from .common import check_choice, check_positive_int, compute_dtype, no_autocast
from .functional import expert_mlp
from .fused.buffers import pool_of
from .fused.experts import experts_forward

EXPERT_INITS = ("identical", "distinct")


class Experts(nn.Module):
    """`y[e] = drop2(W2_e drop1(act(W1_e x[e] + b1_e)) + b2_e)` for every expert e at once;
    by default act = GELU, tanh approximation (Flax's), and no dropout.

    Parameters (named as the official checkpoints' layout, transposed to (in, out)):
      w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).

    forward(x: (E, M, D)) -> (E, M, D). The layers only ever call this module: expert
    parallelism shards it from outside, and a subclass or another module with this contract
    can take its place.

    act_layer: the hidden activation, an `nn.Module` class (instantiated with no arguments) or
      instance (e.g. the activation of a timm MLP being converted); None: `nn.GELU("tanh")`.
    drop1, drop2: dropout modules after the activation and after the second matmul (None:
      none), as timm's `Mlp` has them.

    expert_init:
      "identical" (vmoe's default, `split_rngs=False`): every expert starts from the same
        xavier-uniform kernels; routing differences break the symmetry during training.
      "distinct": each expert's kernels drawn independently.

    impl: "fused" (default): the same function, faster, through `softmoe.layers.fused.experts`
      wherever that applies (a GELU activation, no active dropout, first-order gradients
      only; see `fused_applies`), else `functional.expert_mlp`; "reference": always
      `functional.expert_mlp` (plain autograd; double backward works).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, expert_init: str = "identical",
                 bias_init_std: float = 1e-6, impl: str = "fused", act_layer=None,
                 drop1: nn.Module | None = None, drop2: nn.Module | None = None) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.dim = check_positive_int("dim", dim)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.expert_init = check_choice("expert_init", expert_init, EXPERT_INITS)
        self.bias_init_std = bias_init_std
        self.impl = fused.check_impl(impl)
        if act_layer is None:
            act_layer = nn.GELU(approximate="tanh")
        elif isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
            act_layer = act_layer()
        if not isinstance(act_layer, nn.Module):
            raise ValueError(f"act_layer must be an nn.Module class or instance (or None for GELU tanh), "
                             f"got {act_layer!r}")
        self.act = act_layer
        self.drop1 = drop1 if drop1 is not None else nn.Identity()
        self.drop2 = drop2 if drop2 is not None else nn.Identity()
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
        """x (E, M, D) -> (E, M, D), in the autocast dtype under autocast, else x's dtype."""
        w = (self.w1, self.b1, self.w2, self.b2)
        if self.fused_applies(x):
            train = fused.records_graph(x, self)
            dtype = compute_dtype(x)  # under autocast the MLP runs in its dtype, as autocast would run it
            with no_autocast(x.device.type):
                return experts_forward(x.to(dtype), *(t.to(dtype) for t in w), self.act.approximate,
                                       pool_of(self) if train else None, train)
        return expert_mlp(x, *w, self.act, self.drop1, self.drop2)  # (E, M, D)

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether forward(x) takes the fused path: `fused.applies` (impl, dtypes, device,
        compile), a GELU activation (exact or tanh) and no dropout that is active."""
        return (isinstance(self.act, nn.GELU) and not (self.training and (_active(self.drop1) or _active(self.drop2)))
                and fused.applies(self, x))

    def extra_repr(self) -> str:  # act, drop1, drop2 print as children
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"expert_init={self.expert_init!r}, impl={self.impl!r}")


def _active(drop: nn.Module) -> bool:
    """Whether a dropout module changes its input in training (anything but Identity or p=0)."""
    return not isinstance(drop, nn.Identity) and getattr(drop, "p", None) != 0
