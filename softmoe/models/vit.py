"""Vision Transformer with optional MoE blocks, as vmoe's `vit_moe.py` (SPEC.md §3).

    x      = patch_embed(images) + pos_embed    # (B, N, D), N = (img_size / patch_size)**2
    x      = [cls_token; x]                     # only with pool="token": (B, 1 + N, D)
    for block in blocks:                        # pre-LN
        x += attn(LN(x))
        x += mlp_or_moe(LN(x))                  # MoE in the blocks of `moe_placement`
    x      = LN(x)                              # forward_features -> (B, N, D)
    pooled = mean over tokens | cls token | MAP # (B, D)   ("gap" is the paper's default)
    logits = head(pooled)                       # (B, num_classes)

Position embedding: learned, one vector per patch (the class token gets none, as in
big_vision/vmoe), init N(0, 0.02). LayerNorm eps 1e-6 everywhere. Head kernel zero, bias
-log(num_classes). MoE layers get hidden width = the dense MLP width.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

from .layers import Block, MAPHead, Mlp, PatchEmbed

# MoE layers a config can name (canonical class name -> class) and accepted aliases.
MOE_LAYERS: dict[str, type[nn.Module]] = {
    "SoftMoE": SoftMoE, "TokensChoiceMoE": TokensChoiceMoE, "ExpertsChoiceMoE": ExpertsChoiceMoE}
MOE_ALIASES = {
    "soft": "SoftMoE", "soft_moe": "SoftMoE", "softmoe": "SoftMoE",
    "tokens_choice": "TokensChoiceMoE", "tc": "TokensChoiceMoE", "tc_moe": "TokensChoiceMoE",
    "experts_choice": "ExpertsChoiceMoE", "ec": "ExpertsChoiceMoE", "ec_moe": "ExpertsChoiceMoE"}
# Arguments the model derives itself, so moe_kwargs may not set them.
_DERIVED_MOE_ARGS = ("dim", "num_experts", "hidden_dim")
POOLS = ("gap", "token", "map")


def resolve_moe_type(moe_type: str) -> str:
    """Canonical class name for a MoE type name or alias; ValueError if unknown."""
    name = MOE_ALIASES.get(moe_type, moe_type) if isinstance(moe_type, str) else moe_type
    if not isinstance(name, str) or name not in MOE_LAYERS:
        raise ValueError(f"moe_type must be one of {sorted(MOE_LAYERS) + sorted(MOE_ALIASES)} or None, got {moe_type!r}")
    return name


def moe_block_indices(placement, depth: int) -> tuple[int, ...]:
    """Which blocks hold a MoE layer.

    placement: "last_half" (the paper: blocks depth//2.. for even depth, e.g. 6-11 of 12),
      "last:N" (the last N blocks), "every:K" (blocks K-1, 2K-1, ..., so the last block is
      always MoE, V-MoE's "every other layer" for K=2), "all", or an explicit list of
      block indices in [0, depth).
    """
    bad = ValueError(f"moe_placement must be 'last_half', 'last:N', 'every:K', 'all' or a list of block indices "
                     f"in [0, depth={depth}), got {placement!r}")
    if isinstance(placement, str):
        kind, _, arg = placement.partition(":")
        if placement == "last_half":
            return tuple(range(depth - depth // 2, depth))
        if placement == "all":
            return tuple(range(depth))
        if kind in ("last", "every") and arg.isdigit():
            n = int(arg)
            if kind == "last" and 1 <= n <= depth:
                return tuple(range(depth - n, depth))
            if kind == "every" and 1 <= n <= depth:
                return tuple(i for i in range(depth) if (i + 1) % n == 0)
        raise bad
    if isinstance(placement, (list, tuple)) and placement:
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in placement):
            raise bad
        if len(set(placement)) != len(placement):
            raise ValueError(f"moe_placement lists a block twice: {list(placement)}")
        return tuple(sorted(placement))
    raise bad


@dataclass
class ViTConfig:
    """Everything needed to build a `VisionTransformer`; every field is JSON-serialisable.

    Defaults are ViT-B/16 at 224 px, dense. Set `moe_type` ("SoftMoE", "TokensChoiceMoE",
    "ExpertsChoiceMoE" or an alias such as "soft"), `num_experts` and optionally
    `moe_placement` and `moe_kwargs` (extra constructor arguments of the MoE layer, e.g.
    {"slots_per_expert": 2} or {"k": 2, "capacity_factor": 1.05}) for a MoE model.
    """
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head, forward returns the pooled features
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    qk_norm: bool = True
    pool: str = "gap"  # "gap" (paper), "token" (class token) or "map" (attention pooling)
    layer_norm_eps: float = 1e-6
    moe_type: str | None = None
    num_experts: int = 0
    moe_placement: str | list[int] = "last_half"
    moe_kwargs: dict = field(default_factory=dict)
    name: str = "vit"  # informational: the registry name the config came from

    def __post_init__(self) -> None:
        for key in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            _check_int(key, getattr(self, key), 1)
        _check_int("num_classes", self.num_classes, 0)
        _check_int("num_experts", self.num_experts, 0)
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")
        for key in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be a bool, got {getattr(self, key)!r}")
        if not isinstance(self.moe_kwargs, dict):
            raise ValueError(f"moe_kwargs must be a dict, got {self.moe_kwargs!r}")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {self.name!r}")
        if isinstance(self.moe_placement, tuple):
            self.moe_placement = list(self.moe_placement)  # lists round-trip through JSON
        moe_block_indices(self.moe_placement, self.depth)  # checked for dense configs too
        if self.moe_type is None:
            if self.num_experts or self.moe_kwargs:
                raise ValueError(f"num_experts={self.num_experts} / moe_kwargs={self.moe_kwargs} need a moe_type "
                                 f"(one of {sorted(MOE_LAYERS)}); a dense ViT has num_experts=0")
            return
        self.moe_type = resolve_moe_type(self.moe_type)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 for moe_type={self.moe_type!r}, got {self.num_experts}")
        accepted = [p for p in inspect.signature(MOE_LAYERS[self.moe_type].__init__).parameters
                    if p not in ("self", *_DERIVED_MOE_ARGS)]
        unknown = sorted(set(self.moe_kwargs) - set(accepted))
        if unknown:
            raise ValueError(f"moe_kwargs has arguments {self.moe_type} does not accept: {unknown}; "
                             f"accepted: {accepted} (dim, num_experts and hidden_dim come from the config)")
        with torch.device("meta"):  # validates moe_kwargs now, not at the first forward
            layer = MOE_LAYERS[self.moe_type](self.embed_dim, self.num_experts, hidden_dim=self.mlp_dim,
                                              **self.moe_kwargs)
        if hasattr(layer, "capacity_for"):  # sparse routing: each expert must take >= 1 token
            layer.capacity_for(layer.group_size * self.num_tokens)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Tokens per image inside the blocks (patches, plus the class token if any)."""
        return self.num_patches + (self.pool == "token")

    @property
    def moe_blocks(self) -> tuple[int, ...]:
        return () if self.moe_type is None else moe_block_indices(self.moe_placement, self.depth)

    def replace(self, **changes) -> "ViTConfig":
        """A validated copy with `changes` applied; unknown keys -> ValueError."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a ViTConfig must be built from a dict, got {type(d).__name__}")
        _check_keys(d)
        return cls(**d)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_keys(d: dict) -> None:
    import difflib

    fields = [f.name for f in dataclasses.fields(ViTConfig)]
    unknown = [k for k in d if k not in fields]
    if unknown:
        hints = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {h[0]!r}?" for k, h in hints.items() if h)
        raise ValueError(f"unknown ViTConfig field(s) {unknown}{' (' + hint + ')' if hint else ''}; "
                         f"valid fields: {fields}")


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
        cfg = self.config
        cls = MOE_LAYERS[cfg.moe_type]
        return cls(dim=cfg.embed_dim, num_experts=cfg.num_experts, hidden_dim=cfg.mlp_dim, **cfg.moe_kwargs)

    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        head = nn.Linear(self.config.embed_dim, num_classes)
        if not head.weight.is_meta:
            with torch.no_grad():
                head.weight.zero_()
                head.bias.fill_(-math.log(num_classes))  # vmoe: sigmoid outputs start at 1/C
        return head

    def reset_parameters(self) -> None:
        """Position embedding N(0, 0.02), class token 0 (the sub-modules initialise themselves)."""
        if self.pos_embed.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.pos_embed, std=0.02)
            if self.cls_token is not None:
                self.cls_token.zero_()

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
        """Parameter names without weight decay (SPEC §4): biases, norms, position embedding,
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
