"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a MoE model initialised from a dense one.

Every expert of each new MoE layer starts as a copy of the dense MLP it replaces
(w1 = fc1.weight.T, b1 = fc1.bias, w2 = fc2.weight.T, b2 = fc2.bias); every other weight is
copied; the Soft MoE router `phi` (lecun normal, scale 1) and the Tokens/Experts Choice gates
are freshly initialised.

The upcycled model does NOT compute the dense function at initialisation (docs/models.md
has the measured gaps): with identical experts f,
  - Soft MoE: y_n = sum_s C[n,s] f(sum_m D[m,s] x_m). Each slot mixes many tokens and f is
    nonlinear, so y_n != f(x_n); near-uniform routing at init gives nearly the same output
    for every token. Only identity dispatch/combine (token i -> slot i) reproduces f exactly.
  - Tokens Choice: y_n = (sum of the gates of n's kept choices) f(x_n); the gates are not
    renormalised (with unit-variance tokens and E = 8, top-1 gates average ~0.3 at init) and
    choices past capacity are dropped (y_n = 0).
    Exact only with k = E and capacity >= tokens per group (the gates then sum to 1).
  - Experts Choice: y_n = (sum of the gates of the experts that picked n) f(x_n): tokens
    picked by none get 0. Exact only when every expert takes every token (capacity = T).
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import Mlp
from .registry import FAMILIES
from .timm_interop import expert_tensors_from_mlp, timm_to_moe
from .config import MoEConfig, ViTConfig, resolve_moe_type
from .vit import VisionTransformer, build_model

_FAMILY_OF = {moe: family for family, moe in FAMILIES.items()}


def _upcycled_name(name: str, moe_type: str) -> str:
    """vit_s16 -> soft_moe_s16 (etc.); other names get a suffix."""
    family = _FAMILY_OF[moe_type]
    return family + name[len("vit"):] if name.startswith("vit_") else f"{name}-upcycled-{family}"


def upcycle(dense_model: nn.Module, moe_type: str = "soft", num_experts: int = 8, placement="last_half",
            **moe_kwargs) -> nn.Module:
    """A MoE model whose experts are copies of `dense_model`'s MLPs (see the module doc).

    dense_model: a dense softmoe `VisionTransformer`, or a timm VisionTransformer (then the
      result is the timm model with MoE layers, see `timm_interop.timm_to_moe`).
    moe_type: "soft" / "tc" / "ec" or a class name; placement: as `MoEConfig.placement`;
    moe_kwargs: further MoE layer options, `MoEConfig` fields (slots_per_expert, k, capacity_factor, ...).
    The result is a new model on the dense model's device, in its dtype; the dense model is
    not modified. For a softmoe model it is in the dense model's train/eval mode.
    """
    if not isinstance(dense_model, VisionTransformer):
        return timm_to_moe(dense_model, moe_type, num_experts, placement, init="upcycle", **moe_kwargs)
    cfg: ViTConfig = dense_model.config
    if cfg.moe_type is not None:
        raise ValueError(f"dense_model must be a dense ViT (config.moe_type None), got moe_type={cfg.moe_type!r}")
    moe_type = resolve_moe_type(moe_type)
    moe = MoEConfig.from_layer_kwargs(moe_type, num_experts, placement, **moe_kwargs)
    new_cfg = cfg.replace(moe=moe, name=_upcycled_name(cfg.name, moe_type))
    ref = dense_model.pos_embed
    with torch.device(ref.device):
        model = build_model(new_cfg)  # fresh routers / gates come from here
    model.to(dtype=ref.dtype)
    state = dict(model.state_dict())
    dense_state = dense_model.state_dict()
    moe_blocks = set(new_cfg.moe_blocks)
    for key, value in dense_state.items():
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        if block in moe_blocks and key.startswith(f"blocks.{block}.mlp."):
            continue  # the dense MLP becomes the experts below
        state[key] = value
    for i in sorted(moe_blocks):
        mlp = dense_model.blocks[i].mlp
        if not isinstance(mlp, Mlp):
            raise ValueError(f"dense_model.blocks[{i}].mlp must be a dense Mlp, got {type(mlp).__name__}")
        for name, value in expert_tensors_from_mlp(mlp.fc1, mlp.fc2, num_experts).items():
            state[f"blocks.{i}.mlp.experts.{name}"] = value
    model.load_state_dict(state, strict=True)
    model.train(dense_model.training)
    return model


@torch.no_grad()
def upcycling_gap(dense_model: nn.Module, moe_model: nn.Module, images: torch.Tensor) -> dict:
    """How far an upcycled model is from its dense source on `images` (both in eval mode).

    Returns {"logits": (max_abs, rel), "features": (max_abs, rel), "layers": {block_index:
    (max_abs, rel)}}, "features" being the pooled pre-logits (B, D), where rel =
    ||a - b|| / ||b|| (Frobenius), and each layer's figure compares the MoE layer with the
    dense MLP on the SAME input (the dense model's LayerNorm output at that block), so the
    layer figures do not accumulate earlier layers' differences.
    """
    inputs: dict[int, torch.Tensor] = {}
    hooks = [block.mlp.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, block in enumerate(dense_model.blocks)]
    was = dense_model.training, moe_model.training
    dense_model.eval(), moe_model.eval()
    try:
        dense_feats = dense_model.forward_head(dense_model.forward_features(images), pre_logits=True)  # (B, D)
        moe_feats = moe_model.forward_head(moe_model.forward_features(images), pre_logits=True)  # (B, D)
        dense_logits, moe_logits = dense_model.head(dense_feats), moe_model.head(moe_feats)  # (B, classes)
        layers = {}
        for i, (dense_block, moe_block) in enumerate(zip(dense_model.blocks, moe_model.blocks)):
            if dense_block.mlp is moe_block.mlp or type(dense_block.mlp) is type(moe_block.mlp):
                continue
            layers[i] = _gap(moe_block.mlp(inputs[i]), dense_block.mlp(inputs[i]))
    finally:
        for h in hooks:
            h.remove()
        dense_model.train(was[0]), moe_model.train(was[1])
    return {"logits": _gap(moe_logits, dense_logits), "features": _gap(moe_feats, dense_feats), "layers": layers}


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).double()
    return float(diff.abs().max()), float(diff.norm() / b.double().norm().clamp_min(1e-300))


__all__ = ["upcycle", "upcycling_gap"]
