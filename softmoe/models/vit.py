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

import torch
from torch import nn

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
        x = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, N, D) -> pooled (B, D) if pre_logits else logits (B, num_classes)."""
        if self.config.pool == "gap":
            x = x.mean(dim=1)
        elif self.config.pool == "token":
            x = x[:, 0]
        else:
            x = self.attn_pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # -- utilities ---------------------------------------------------------------------------
    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one for `num_classes` (0: no head), on the same device
        and in the same dtype as the model."""
        _check_int("num_classes", num_classes, 0)
        with torch.device(self.norm.weight.device):
            self.head = self._make_head(num_classes).to(self.norm.weight.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)

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


def build_model(cfg: ViTConfig) -> VisionTransformer:
    """The model for `cfg` (builds on the current default device, e.g. under
    `with torch.device("meta"):` for counting without memory)."""
    return VisionTransformer(cfg)
