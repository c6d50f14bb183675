"""The ViT building blocks of vmoe's `vit_moe.py` (docs/design.md §3), with Flax's initialisers.

Letters: B batch, C channels, N tokens, D width, h heads, d = D/h head width, H MLP width.

Every `reset_parameters` returns early on meta tensors, so a model of any size can be built
under `with torch.device("meta"):` to count parameters and FLOPs without memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
import torch.fx._symbolic_trace as _fx_trace

# Flax's truncated-normal initialisers divide by this to keep the requested std after the
# truncation at +-2 standard deviations (same constant as softmoe.layers.router).
_TRUNC_STD_CORRECTION = 0.87962566103423978


def lecun_normal_(w: torch.Tensor, fan_in: int) -> None:
    """Flax `lecun_normal`: truncated normal with std sqrt(1/fan_in)."""
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD_CORRECTION
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


def xavier_uniform_(w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(w, -bound, bound)


# torch >= 2.6 names the symbolic-tracing check apart (is_fx_tracing now also covers export, and
# warns saying so); older torch has only is_fx_tracing.
_is_fx_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", _fx_trace.is_fx_tracing)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, C, H, W) -> (B, N, D), N = (H/p)*(W/p)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.proj.weight.is_meta:
            return
        with torch.no_grad():
            lecun_normal_(self.proj.weight, fan_in=self.in_chans * self.patch_size ** 2)  # Flax nn.Conv default
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _is_fx_tracing():  # torch.fx traces with shapeless proxies (timm's feature extraction)
            self._check_input(x)
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (B, in_chans={self.in_chans}, {self.img_size}, "
                             f"{self.img_size}), got {tuple(x.shape)}")
        if x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(f"expected images of {self.img_size}x{self.img_size} pixels (img_size={self.img_size}), "
                             f"got {x.shape[2]}x{x.shape[3]}; build the model with img_size={x.shape[2]} "
                             f"(from_pretrained(..., img_size=...) interpolates the position embedding)")
        w = self.proj.weight
        if not x.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {x.dtype} "
                             f"(softmoe.data.to_model_input converts uint8 images)")
        if x.dtype != w.dtype and not (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)):
            raise ValueError(f"images have dtype {x.dtype} but the model's parameters are {w.dtype}: "
                             f"use x.to({w.dtype}), model.to({x.dtype}) or torch.autocast")


class Attention(nn.Module):
    """Multi-head self-attention with optional qk-LayerNorm (no bias) over the head dim.

    vmoe uses separate query/key/value projections, each xavier-uniform over (D, D); we fuse
    them into one (D, 3D) matmul (same FLOPs) but initialise each third as its own (D, D).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps, bias=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps, bias=False) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.qkv.weight.is_meta:
            return
        D = self.proj.in_features
        with torch.no_grad():
            for w in self.qkv.weight.split(D, dim=0):  # q, k, v: (D, D) each
                xavier_uniform_(w, D, D)
            xavier_uniform_(self.proj.weight, D, D)
            if self.qkv.bias is not None:
                self.qkv.bias.zero_()
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, h, N, d)
        q, k, v = qkv.unbind(0)  # (B, h, N, d) each
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d), softmax(q k^T / sqrt(d)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    """Dense MLP: (B, N, D) -> (B, N, D) through H hidden units, GELU tanh approximation."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.fc1.weight.is_meta:
            return
        with torch.no_grad():  # vmoe MlpBlock: xavier-uniform kernels, N(0, 1e-6) biases
            for fc in (self.fc1, self.fc2):
                xavier_uniform_(fc.weight, fc.in_features, fc.out_features)
                fc.bias.normal_(0.0, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN transformer block: x += Attn(LN(x)); x += MLP_or_MoE(LN(x)).

    `mlp` is a dense `Mlp` or any MoE layer from softmoe.layers (called as `mlp(x)`).
    """

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, qkv_bias: bool = True, qk_norm: bool = True,
                 eps: float = 1e-6) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))  # (B, N, D)
        return x + self.mlp(self.norm2(x))  # (B, N, D)


class MAPHead(nn.Module):
    """Multi-head attention pooling (big_vision `MAPHead`): a learned probe attends over the
    tokens, then a residual MLP: (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.probe.is_meta:
            return
        D = self.probe.shape[-1]
        with torch.no_grad():
            xavier_uniform_(self.probe, D, D)
            for w in (self.q.weight, *self.kv.weight.split(D, dim=0), self.proj.weight):
                xavier_uniform_(w, D, D)
            for b in (self.q.bias, self.kv.bias, self.proj.bias):
                b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h, d = self.num_heads, self.head_dim
        # Per-image probe projection (B rows, not 1) so the cost is per image, as counted.
        # repeat, not expand: a no_grad view of a parameter breaks FlopCounterMode's module hooks.
        q = self.q(self.probe.repeat(B, 1, 1)).view(B, 1, h, d).transpose(1, 2)  # (B, h, 1, d)
        kv = self.kv(x).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4)  # (2, B, h, N, d)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, h, 1, d)
        y = self.proj(y.transpose(1, 2).reshape(B, 1, D))  # (B, 1, D)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]  # (B, D)
