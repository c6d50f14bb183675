"""Vision Transformer with optional MoE blocks, as vmoe's `vit_moe.py` (docs/design.md §3).

    x      = patch_embed(images) + pos_embed    # (B, N, D), N = (img_size / patch_size)**2
    x      = [cls_token; x]                     # only with pool="token": (B, 1 + N, D)
    for block in blocks:                        # pre-LN
        x += attn(LN(x))
        x += mlp_or_moe(LN(x))                  # MoE in the blocks of `config.moe.placement`
    x      = LN(x)                              # forward_features -> (B, N, D)
    pooled = mean over tokens | cls token | MAP # (B, D)   ("gap" is the paper's default)
    logits = head(pooled)                       # (B, num_classes)

Position embedding: learned, one vector per patch (the class token gets none, as in
big_vision/vmoe), init N(0, 0.02). LayerNorm eps 1e-6 everywhere. Head kernel zero, bias
-log(num_classes). MoE layers get hidden width = the dense MLP width.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The config lives in .config; these names stay importable from here as well.
from .config import (MOE_LAYERS, MoEConfig, ViTConfig, _check_int, moe_block_indices,  # noqa: F401
                     resolve_moe_type)
from .layers import Block, MAPHead, Mlp, PatchEmbed


class VisionTransformer(nn.Module):
    """ViT / V-MoE / Soft MoE ViT built from a `ViTConfig` (kept as `model.config`)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        self.config = cfg = config
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, D))
        self.cls_token = nn.Parameter(torch.empty(1, 1, D)) if cfg.pool == "token" else None
        moe_blocks = set(cfg.moe_blocks)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, self._make_moe() if i in moe_blocks else Mlp(D, cfg.mlp_dim),
                  qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, eps=cfg.layer_norm_eps)
            for i in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn_pool = MAPHead(D, cfg.num_heads, cfg.mlp_dim, cfg.layer_norm_eps) if cfg.pool == "map" else None
        self.head = self._make_head(cfg.num_classes)
        # timm's model contract (docs/models.md "timm"): attributes its tools read.
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = D  # pooled width = token width
        self.num_prefix_tokens = 1 if cfg.pool == "token" else 0
        self.global_pool = _TIMM_POOL[cfg.pool]  # "" after reset_classifier(0, ""): unpooled tokens
        self.grad_checkpointing = False
        self.feature_info = [dict(num_chs=D, reduction=cfg.patch_size, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        self.pretrained_cfg = self.default_cfg = timm_cfg(cfg)
        self.reset_parameters()

    def _make_moe(self) -> nn.Module:
        return self.config.moe.build(self.config.embed_dim, self.config.mlp_dim)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.config.embed_dim, num_classes)
        self._init_head(head)
        return head

    @staticmethod
    def _init_head(head: nn.Module) -> None:
        if isinstance(head, nn.Linear) and not head.weight.is_meta:
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(-math.log(head.out_features))  # vmoe: sigmoid outputs start at 1/C

    def reset_parameters(self) -> None:
        """Position embedding N(0, 0.02), class token 0, head kernel 0 and bias -log C (the other
        sub-modules initialise themselves)."""
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                self.cls_token.zero_()
        self._init_head(self.head)

    # -- forward -----------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens after the final LayerNorm (B, N, D) ((B, 1+N, D) with
        a class token)."""
        x = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x)
        return self.norm(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        return x

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, N, D) -> pooled (B, D) if pre_logits else logits (B, num_classes); the
        tokens unchanged after `reset_classifier(0, global_pool="")`."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "map":
            x = self.attn_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- utilities ---------------------------------------------------------------------------
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head by a fresh one for `num_classes` (0: no head), on the same device,
        in the same dtype and train/eval mode as the model. `global_pool`: None keeps the
        pooling, "" removes it (forward returns the tokens (B, N, D)); the model's own pooling
        ("avg" / "token" / "map", as built) may be set back. Other pools need another model
        (the class token and MAP head are built with it)."""
        _check_int("num_classes", num_classes, 0)
        if global_pool is not None:
            own = _TIMM_POOL[self.config.pool]
            if global_pool not in ("", own):
                raise ValueError(f"global_pool must be None, '' or this model's pool {own!r}, got {global_pool!r} "
                                 f"(build the model with pool=... for another pooling)")
            self.global_pool = global_pool
        ref = self.norm.weight
        with torch.device(ref.device):
            self.head = self._make_head(num_classes).to(ref.dtype).train(self.training)
        self.num_classes = num_classes
        self.config = dataclasses.replace(self.config, num_classes=num_classes)
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise LR decay (as timm's ViTs): embeddings, one group per
        block, the final norm merged into the last block's group (timm's MATCH_PREV_GROUP); the pooling
        head and classifier match no group, so timm gives them a last layer of their own (full lr)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    # -- intermediate features (timm's forward_intermediates API) ----------------------------
    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The tokens after the blocks `indices` (None: all; an int n: the last n; a list: those,
        negative counting from the end), as maps (B, D, H/p, W/p) for output_fmt "NCHW" or tokens
        (B, N, D) for "NLC" (class token dropped). `norm` applies the final LayerNorm to them.
        Returns the list if `intermediates_only`, else (forward_features(x), list)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = self._take_indices(indices)
        B, grid = x.shape[0], self.patch_embed.grid
        x = self._embed(x)
        blocks = self.blocks if not stop_early else self.blocks[:last + 1]
        out = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x)
            if i in take:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens:]  # (B, N, D)
                out.append(y.transpose(1, 2).reshape(B, -1, grid, grid) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of `indices` (and the final norm / head if asked), for a
        feature-extraction backbone; returns the indices (non-negative)."""
        take, last = self._take_indices(indices)
        self.blocks = self.blocks[:last + 1]
        self.feature_info = self.feature_info[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.attn_pool = None
            self.global_pool = ""
            self.head = nn.Identity()
            self.num_classes = 0
        return take

    def _take_indices(self, indices) -> tuple[list[int], int]:
        n = len(self.blocks)
        if indices is None:
            take = list(range(n))
        elif isinstance(indices, int) and not isinstance(indices, bool):
            if not 0 < indices <= n:
                raise ValueError(f"indices must be in 1..{n} (the last n blocks), got {indices}")
            take = list(range(n - indices, n))
        else:
            take = [i + n if isinstance(i, int) and i < 0 else i for i in indices]
            if not take or not all(isinstance(i, int) and 0 <= i < n for i in take):
                raise ValueError(f"indices must be block indices in [-{n}, {n}), got {indices!r}")
        return take, max(take)

    def no_weight_decay(self) -> set[str]:
        """Parameter names without weight decay (docs/design.md §4): biases, norms, position embedding,
        class token, and the Soft MoE router's phi. Kernels and the router scale are decayed."""
        names = set()
        norm_params = {f"{m}.{p}" if m else p for m, mod in self.named_modules() if isinstance(mod, nn.LayerNorm)
                       for p, _ in mod.named_parameters(recurse=False)}
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (name in norm_params or leaf in ("bias", "b1", "b2", "pos_embed", "cls_token")
                    or name.endswith("router.phi")):
                names.add(name)
        return names

    def save_pretrained(self, directory) -> None:
        """`softmoe.models.hub.save_pretrained(self, directory)`."""
        from .hub import save_pretrained

        return save_pretrained(self, directory)


# ViTConfig.pool -> timm's global_pool name.
_TIMM_POOL = {"gap": "avg", "token": "token", "map": "map"}


def timm_cfg(cfg: ViTConfig) -> dict:
    """timm's `pretrained_cfg` for a model of `cfg`: what its data pipeline and tests read. Our
    models take values in [-1, 1] (mean = std = 0.5 on [0, 1] pixels), full-image resize (crop_pct 1),
    at exactly `img_size` (fixed_input_size: build with img_size=... for another resolution)."""
    g = cfg.img_size // cfg.patch_size
    return {"architecture": cfg.name, "input_size": (cfg.in_chans, cfg.img_size, cfg.img_size),
            "fixed_input_size": True, "pool_size": (g, g), "mean": (0.5,) * cfg.in_chans,
            "std": (0.5,) * cfg.in_chans, "interpolation": "bicubic", "crop_pct": 1.0,
            "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj", "classifier": "head"}


def build_model(cfg: ViTConfig) -> VisionTransformer:
    """The model for `cfg` (builds on the current default device, e.g. under
    `with torch.device("meta"):` for counting without memory)."""
    return VisionTransformer(cfg)
