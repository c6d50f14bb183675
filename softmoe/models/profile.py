"""Parameter and inference-FLOP counts, from the config alone (works for models built on
the meta device, e.g. the 54B Soft MoE-H/14).

FLOP convention (the paper's, docs/design.md §3): a multiply-add is 2 FLOPs and only matmuls and
einsums count: the patch-embedding conv, q/k/v and output projections, attention scores
(q k^T) and the attention-weighted sum, MLPs and experts, the MoE routers' logits, Soft MoE's
dispatch and combine einsums, the MAP head and the classifier. LayerNorm, softmax, GELU,
bias adds and residuals are not counted. Tokens/Experts Choice dispatch and combine are
gathers/scatters in this implementation (0 FLOPs); their experts process E*C items per
group of `group_size` images, whatever the routing. `tests/models/test_profile.py` checks
the formula against torch.utils.flop_counter.FlopCounterMode on real forward passes.

Table 8 of the paper (29,593-class head, 224 px) is reproduced by these formulas: parameters
to the paper's printed precision in every row, which confirms that the paper counts the
position embedding (0.23% of ViT-S/16), the head, every expert of every MoE layer, and
P = 1 slot per expert for the 256-expert S/14 (P = 2 would add 0.59M router parameters);
the qk-norm scales (2 x head dim per block) are below the printed precision. GFLOP/img are
0.26-0.58% below the paper in every row, dense and MoE alike (`softmoe bench paper`).
The shortfall is systematic, not a missing layer: with the paper's rounding (+-0.05 G),
the gap per token and per block is ~80-90 FLOPs per channel D for every dense row (S, B,
L, H), slightly more for MoE rows, which is what elementwise work costs (LayerNorms and
qk-norms ~8 ops/channel, GELU-tanh on 4D hidden units, bias adds, residuals, softmaxes).
The paper's counts likely come from XLA's cost analysis, which counts elementwise ops; the
design-doc convention (docs/design.md §3, and FlopCounterMode) does not. No matmul of this architecture is that
small (a missing D x D projection alone would be 2*D**2 per token, 18-30x the gap).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .config import ViTConfig
from .gpt import GPT, GPTConfig


def _config_of(obj) -> ViTConfig | GPTConfig:
    if isinstance(obj, (ViTConfig, GPTConfig)):
        return obj
    cfg = getattr(obj, "config", None)
    if isinstance(cfg, (ViTConfig, GPTConfig)):
        return cfg
    raise ValueError(f"expected a ViTConfig / GPTConfig or a model with one in .config, got {type(obj).__name__}")


# -- decoders (softmoe/models/gpt.py): per sequence of block_size tokens ----------------------------
def gpt_param_breakdown(model_or_config) -> dict[str, int]:
    """Parameters of a GPT per component: tok_emb, pos_emb, attention, norms, mlp, moe_router,
    moe_experts, head (0 when tied to the token embedding)."""
    if isinstance(model_or_config, GPTConfig):
        with torch.device("meta"):
            model = GPT(model_or_config)
    else:
        model = model_or_config
    out = dict.fromkeys(("tok_emb", "pos_emb", "attention", "norms", "mlp", "moe_router", "moe_experts", "head"), 0)
    for name, p in model.named_parameters():  # a tied head is the token embedding: counted once
        parts = name.split(".")
        if parts[0] == "blocks":
            sub = parts[2]
            key = ("attention" if sub == "attn" else "norms" if sub.startswith("ln") else
                   "moe_experts" if parts[3] == "experts" else "moe_router" if parts[3] == "router" else "mlp")
        else:
            key = {"tok_emb": "tok_emb", "pos_emb": "pos_emb", "ln_f": "norms", "head": "head"}.get(parts[0])
            if key is None:
                raise ValueError(f"gpt_param_breakdown does not know where parameter {name!r} belongs")
        out[key] += p.numel()
    return out


def gpt_flop_breakdown(cfg: GPTConfig, tokens: int | None = None) -> dict[str, int]:
    """Forward FLOPs of a GPT over one sequence of `tokens` (default block_size), the convention
    above (matmuls and einsums; the attention mix over the full T x T scores, as
    scaled_dot_product_attention computes it). CausalSoftMoE (docs/design.md §8) pads T up to
    K = ceil(T/C) chunks and spends per chunk: router logits 2*C*D*S, dispatch 2*S*C*D, S expert
    evaluations, combine over 2S slots 2*C*2S*D; with S = C its experts cost the dense MLP."""
    T = cfg.block_size if tokens is None else tokens
    D, M, L = cfg.embed_dim, cfg.mlp_dim, cfg.depth
    n_moe = len(cfg.moe_blocks)
    out = dict.fromkeys(("attention_proj", "attention_mix", "mlp", "moe_router", "moe_dispatch_combine",
                         "moe_experts", "head"), 0)
    out["attention_proj"] = L * 2 * T * D * 4 * D
    out["attention_mix"] = L * 2 * (2 * T * T * D)
    out["mlp"] = (L - n_moe) * 2 * T * 2 * D * M
    S = cfg.num_experts * cfg.slots_per_expert
    if cfg.moe_type == "CausalSoftMoE":
        C = cfg.chunk_size or S
        Tp = -(-T // C) * C  # padded to whole chunks
        out["moe_router"] = n_moe * 2 * Tp * D * S
        out["moe_dispatch_combine"] = n_moe * (2 * Tp * S * D + 2 * Tp * 2 * S * D)
        out["moe_experts"] = n_moe * 2 * (Tp // C) * S * 2 * D * M
    elif cfg.moe_type == "SoftMoE":  # the leaky canary: S slots over the whole sequence
        out["moe_router"] = n_moe * 2 * T * D * S
        out["moe_dispatch_combine"] = n_moe * 2 * (2 * T * S * D)
        out["moe_experts"] = n_moe * 2 * S * 2 * D * M
    out["head"] = 2 * T * D * cfg.vocab_size
    return out


def _meta_model(cfg: ViTConfig) -> nn.Module:
    from .vit import build_model

    with torch.device("meta"):
        return build_model(cfg)


def _meta_moe_layer(cfg: ViTConfig) -> nn.Module:
    with torch.device("meta"):
        return cfg.moe.build(cfg.embed_dim, cfg.mlp_dim)


def param_breakdown(model_or_config) -> dict[str, int]:
    """Parameters per component: patch_embed, pos_embed (+ class token), attention (incl.
    qk-norm), norms, mlp (dense), moe_router, moe_experts, map_head, head. A config is built
    on the meta device first (no memory)."""
    if isinstance(model_or_config, (GPTConfig, GPT)):
        return gpt_param_breakdown(model_or_config)
    model = _meta_model(model_or_config) if isinstance(model_or_config, ViTConfig) else model_or_config
    out = dict.fromkeys(("patch_embed", "pos_embed", "attention", "norms", "mlp", "moe_router", "moe_experts",
                         "map_head", "head"), 0)
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "blocks":
            sub = parts[2]
            if sub == "attn":
                key = "attention"
            elif sub.startswith("norm"):
                key = "norms"
            elif parts[3] == "experts":
                key = "moe_experts"
            elif parts[3] in ("router", "gate"):
                key = "moe_router"
            else:
                key = "mlp"
        else:
            key = {"patch_embed": "patch_embed", "pos_embed": "pos_embed", "cls_token": "pos_embed",
                   "norm": "norms", "attn_pool": "map_head", "head": "head"}.get(parts[0])
            if key is None:
                raise ValueError(f"param_breakdown does not know where parameter {name!r} belongs")
        out[key] += p.numel()
    return out


def count_params(model_or_config) -> int:
    """Total parameters of a model (any nn.Module; meta tensors fine) or of the model a
    config builds (on the meta device)."""
    if isinstance(model_or_config, (ViTConfig, GPTConfig)):
        return sum(param_breakdown(model_or_config).values())
    return sum(p.numel() for p in model_or_config.parameters())


def flop_breakdown(model_or_config, batch_size: int | None = None) -> dict[str, int | float]:
    """Inference FLOPs by component for `batch_size` images (None: per image; a float where
    Tokens/Experts Choice routing groups of `group_size` images make it fractional).

    Keys: patch_embed, attention_proj (q, k, v, output), attention_mix (scores + weighted
    sum), mlp, moe_router, moe_dispatch_combine, moe_experts, map_head, head.
    A decoder (GPTConfig or GPT): per sequence of block_size tokens (`gpt_flop_breakdown`),
    times `batch_size` sequences.
    """
    cfg = _config_of(model_or_config)
    if isinstance(cfg, GPTConfig):
        per_seq = gpt_flop_breakdown(cfg)
        return {k: v * (batch_size or 1) for k, v in per_seq.items()}
    group = 1
    moe = None
    if cfg.moe_type is not None:
        moe = _meta_moe_layer(cfg)
        group = getattr(moe, "group_size", 1)
    if batch_size is None:
        total = flop_breakdown(cfg, batch_size=group)
        return {k: (v // group if v % group == 0 else v / group) for k, v in total.items()}
    if batch_size < 1 or batch_size % group:
        raise ValueError(f"batch_size must be a positive multiple of the MoE group_size={group}, got {batch_size}")

    Bt = batch_size
    D, H, p, C = cfg.embed_dim, cfg.mlp_dim, cfg.patch_size, cfg.in_chans
    Np, N = cfg.num_patches, cfg.num_tokens
    L, n_moe = cfg.depth, len(cfg.moe_blocks)
    out = dict.fromkeys(("patch_embed", "attention_proj", "attention_mix", "mlp", "moe_router",
                         "moe_dispatch_combine", "moe_experts", "map_head", "head"), 0)
    out["patch_embed"] = 2 * Bt * Np * (C * p * p) * D
    out["attention_proj"] = L * 2 * Bt * N * D * (3 * D + D)
    out["attention_mix"] = L * 2 * (2 * Bt * N * N * D)  # q k^T and attn @ v, summed over heads
    out["mlp"] = (L - n_moe) * 2 * Bt * N * (2 * D * H)
    if moe is not None:
        E = cfg.num_experts
        if cfg.moe_type == "SoftMoE":
            S = moe.num_slots
            soft = "soft" in (moe.dispatch, moe.combine)
            out["moe_router"] = n_moe * 2 * Bt * N * D * S * soft
            out["moe_dispatch_combine"] = n_moe * 2 * (2 * Bt * N * S * D)
            items = Bt * S  # expert applications: S slots per image
        else:
            out["moe_router"] = n_moe * 2 * Bt * N * D * E  # gate logits
            items = (Bt // group) * E * moe.capacity_for(group * N)  # E*C buffer rows per group
        out["moe_experts"] = n_moe * 2 * items * (2 * D * H)
    if cfg.pool == "map":
        # probe query (1 token), keys/values (N tokens), scores + weighted sum, output, MLP on 1 token
        out["map_head"] = 2 * Bt * (D * D + N * 2 * D * D + 2 * N * D + D * D + 2 * D * H)
    out["head"] = 2 * Bt * D * cfg.num_classes
    return out


def count_flops(model_or_config, batch_size: int | None = None) -> int | float:
    """Inference FLOPs (multiply-add = 2) per image, or for `batch_size` images."""
    return sum(flop_breakdown(model_or_config, batch_size).values())


@dataclass
class ModelProfile:
    name: str
    params: int
    flops: int | float  # per image (classify) or per sequence of block_size tokens (lm)
    moe_blocks: tuple[int, ...]
    num_experts: int
    param_breakdown: dict[str, int]
    flop_breakdown: dict[str, int | float]
    config: ViTConfig | GPTConfig
    task: str = "classify"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["config"] = self.config.to_dict()
        return d


def profile_model(model_name_or_config, /, **overrides) -> ModelProfile:
    """Parameters and FLOPs of a registered model name (with overrides), a ViTConfig or a
    model, computed on the meta device: never allocates the weights."""
    if isinstance(model_name_or_config, str):
        from .registry import get_config

        cfg = get_config(model_name_or_config, **overrides)
    else:
        cfg = _config_of(model_name_or_config)
        if overrides:
            cfg = cfg.replace(**{k: v for k, v in overrides.items() if v is not None}) \
                if isinstance(cfg, GPTConfig) else cfg.replace(**overrides)
    pb = param_breakdown(cfg)
    fb = flop_breakdown(cfg)
    return ModelProfile(name=cfg.name, params=sum(pb.values()), flops=sum(fb.values()), moe_blocks=cfg.moe_blocks,
                        num_experts=cfg.num_experts, param_breakdown=pb, flop_breakdown=fb, config=cfg,
                        task="lm" if isinstance(cfg, GPTConfig) else "classify")
