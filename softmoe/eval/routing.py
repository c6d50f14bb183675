"""Routing diagnostics of a model's MoE layers on a batch of images: how far each router is
from uniform, and the learned logit scale (docs/design.md). The trainer records them at every
evaluation (so their course over training can be plotted) and `softmoe compare` for every run.
"""
from __future__ import annotations

import math

import torch


def group_size(model) -> int:
    """The largest routing group (images) of the model's MoE layers; 1 without sparse layers."""
    from softmoe.layers import moe_layers

    return max([getattr(m, "group_size", 1) or 1 for _, m in moe_layers(model)] or [1])


def routing_diagnostics(model, x) -> dict:
    """Per MoE layer, on the images x:
      Soft MoE: scale (the router's learned logit scale, when it has one), dispatch_entropy
        (each slot's dispatch distribution over the N tokens, entropy divided by log N: 1 =
        uniform, 0 = one token), dispatch_max (mean over slots of the largest
        weight), combine_entropy (over the S slots, divided by log S) and combine_max;
      Tokens Choice: dropped_assignments (fraction of the K choices past capacity) and
        dropped_tokens (fraction of tokens no expert processed);
      Experts Choice: dropped_tokens (fraction of tokens no expert picked).
    """
    from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, moe_layers, record_routing

    group = group_size(model)
    x = x[: len(x) - len(x) % group]
    out: dict[str, dict] = {}
    with torch.no_grad(), record_routing(model, metrics=True, weights=True):
        model(x)
        for name, layer in moe_layers(model):
            w = layer.routing_weights
            if isinstance(layer, SoftMoE):
                d = w["dispatch"].flatten(2).double()  # (B, N, S)
                c = w["combine"].flatten(2).double()
                N, S = d.shape[1], d.shape[2]
                scale = getattr(getattr(layer, "router", None), "scale", None)
                out[name] = {
                    **({"scale": float(scale)} if isinstance(scale, torch.Tensor) else {}),
                    "dispatch_entropy": float(_entropy(d, 1).mean() / math.log(N)) if N > 1 else 0.0,
                    "dispatch_max": float(d.amax(1).mean()),
                    "combine_entropy": float(_entropy(c, 2).mean() / math.log(S)) if S > 1 else 0.0,
                    "combine_max": float(c.amax(2).mean()),
                }
            elif isinstance(layer, TokensChoiceMoE):
                kept = w["kept"]  # (B, N, K) bool
                out[name] = {"dropped_assignments": float(1 - kept.float().mean()),
                             "dropped_tokens": float((~kept.any(-1)).float().mean())}
            elif isinstance(layer, ExpertsChoiceMoE):
                m = layer.metrics
                out[name] = {"dropped_tokens": float(1 - m["ratio_processed_items_by_at_least_1_experts"])}
    return out


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(dim)


def diagnostic_indices(n: int, k: int = 256) -> torch.Tensor:
    """Sorted indices of a fixed random subset of min(k, n) of range(n) (seed 0: the same images
    for every run and evaluation; image folders are sorted by class, so the first k would not do)."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


def router_record(model, dataset, img_size: int, device, k: int = 256) -> dict:
    """routing_diagnostics of `model` (in eval mode) on diagnostic_indices of `dataset`, flattened
    to {"router/<layer>/<metric>": value} for a metrics record; {} without MoE layers."""
    from softmoe.data import to_model_input
    from softmoe.layers import moe_layers

    if not moe_layers(model):
        return {}
    was_training = model.training
    model.eval()
    try:
        x = to_model_input(dataset.images[diagnostic_indices(len(dataset), k)].to(device), img_size)
        diag = routing_diagnostics(model, x)
    finally:
        model.train(was_training)
    return {f"router/{layer}/{m}": v for layer, d in diag.items() for m, v in d.items()}
