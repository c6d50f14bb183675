"""Routing statistics of a trained MoE model, accumulated over batches.

Soft MoE (weights from `SoftMoE.routing_weights`, each (B, N, E, P), flattened to S = E*P
slots in expert-major order: slot s = expert s // P, slot-in-expert s % P):
  per slot    dispatch entropy H_s = -sum_n D[n,s] log D[n,s] (mean over images; also / log N,
              1 = uniform over the tokens, 0 = one token), max and min dispatch weight;
  per expert  combine mass = mean over tokens of sum_p C[n,e,p] (sums to 1 over experts),
              top-combine tokens = tokens whose largest per-expert combine mass is this
              expert's (count over all inspected tokens, and fraction);
  per layer   combine entropy per token -sum_s C log C (mean; / log S), and vmoe's metrics
              combine_weights_{min,max}_mean (mean over tokens of the min/max over slots),
              dispatch_weights_{min,max}_mean (mean over slots of the min/max over tokens).
Tokens Choice: per-expert load (kept assignments / tokens), mean gate, the dropped fraction.
Experts Choice: per-expert mean selected gate, tokens processed by no expert, experts per token.

Statistics accumulate over batches, so any number of images can be inspected.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ...layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, moe_layers, record_routing


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim)


class _Acc:
    """Sums of tensors and a count, for means over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.shape: tuple[int, int, int] = (0, 0, 0)  # (N, E, P|K|C) of the layer, set by the first batch

    def add(self, key: str, value: torch.Tensor, count: float) -> None:
        value = value.detach().double().cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0.0) + count

    def mean(self, key: str) -> torch.Tensor:
        return self.sums[key] / max(self.counts[key], 1.0)


def _soft_batch(acc: _Acc, layer: SoftMoE) -> None:
    w = layer.routing_weights
    B, N, E, P = w["dispatch"].shape
    d = w["dispatch"].reshape(B, N, E * P).double()  # (B, N, S)
    c = w["combine"].reshape(B, N, E * P).double()  # (B, N, S)
    acc.add("slot_dispatch_entropy", _entropy(d, 1).sum(0), B)  # (S,)
    acc.add("slot_dispatch_max", d.amax(1).sum(0), B)
    acc.add("slot_dispatch_min", d.amin(1).sum(0), B)
    mass = c.view(B, N, E, P).sum(-1)  # (B, N, E) per-expert combine mass of each token
    acc.add("expert_combine_mass", mass.sum((0, 1)), B * N)
    top = torch.bincount(mass.argmax(-1).flatten(), minlength=E).double()  # (E,)
    acc.add("expert_top_tokens", top, 1.0)  # a count: summed, never averaged
    acc.add("combine_entropy", _entropy(c, -1).sum(), B * N)
    acc.add("combine_weights_min_mean", c.amin(-1).sum(), B * N)
    acc.add("combine_weights_max_mean", c.amax(-1).sum(), B * N)
    acc.add("dispatch_weights_min_mean", d.amin(1).sum(), B * E * P)
    acc.add("dispatch_weights_max_mean", d.amax(1).sum(), B * E * P)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, P)


def _tc_batch(acc: _Acc, layer: TokensChoiceMoE) -> None:
    w = layer.routing_weights
    B, N, K = w["expert_index"].shape
    E = layer.num_experts
    idx, kept = w["expert_index"].flatten(), w["kept"].flatten()
    load = torch.zeros(E + 1, dtype=torch.float64).index_add_(0, idx.cpu(), kept.cpu().double())[:E]
    acc.add("expert_load", load, B * N)  # kept assignments per token
    acc.add("expert_choices", torch.bincount(idx.cpu().clamp_max(E), minlength=E + 1)[:E].double(), B * N)
    acc.add("expert_mean_gate", w["gates"].double().sum((0, 1)), B * N)
    acc.add("dropped_choices_fraction", (~kept).double().sum(), B * N * K)
    acc.add("tokens_unprocessed_fraction", (~w["kept"].any(-1)).double().sum(), B * N)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, K)


def _ec_batch(acc: _Acc, layer: ExpertsChoiceMoE) -> None:
    w = layer.routing_weights
    R, E, C = w["token_index"].shape
    B, N, _ = w["gates"].shape
    T = B * N // R  # tokens per group
    per_token = torch.zeros(R, T, dtype=torch.float64).scatter_add_(
        1, w["token_index"].reshape(R, -1).cpu(), torch.ones(R, E * C, dtype=torch.float64))  # (R, T)
    acc.add("expert_selected_gate", w["combine"].double().cpu().sum((0, 2)), R * C)
    acc.add("expert_mean_gate", w["gates"].double().sum((0, 1)), B * N)
    acc.add("tokens_unprocessed_fraction", (per_token == 0).double().sum(), R * T)
    acc.add("experts_per_token_mean", per_token.sum(), R * T)
    acc.add("experts_per_token_max", per_token.amax(1).sum(), R)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, C)


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, SoftMoE):
        return "soft"
    if isinstance(layer, TokensChoiceMoE):
        return "tokens_choice"
    if isinstance(layer, ExpertsChoiceMoE):
        return "experts_choice"
    return "other"


@torch.no_grad()
def routing_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                       prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Run `model` (eval mode) over `images` (M, C, H, W) in batches and return one dict per
    MoE layer (module order) with "name", "kind" and its statistics (see module docstring).
    prepare: maps a batch of `images` (e.g. uint8) to model input; None = already model-ready.
    Raises ValueError when the model has no MoE layer."""
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("the model has no MoE layer (SoftMoE, TokensChoiceMoE or ExpertsChoiceMoE) to inspect; "
                         "is this a dense ViT checkpoint?")
    if images.shape[0] == 0:
        raise ValueError("no images to inspect")
    accs = {name: _Acc() for name, _ in layers}
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with record_routing(model, metrics=False, weights=True):
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size]
                model.forward_features((prepare(batch) if prepare is not None else batch).to(dev))
                for name, layer in layers:
                    kind = _layer_kind(layer)
                    if kind == "soft":
                        _soft_batch(accs[name], layer)
                    elif kind == "tokens_choice":
                        _tc_batch(accs[name], layer)
                    elif kind == "experts_choice":
                        _ec_batch(accs[name], layer)
                    layer.routing_weights = {}  # free the (B, N, E, P) tensors
    finally:
        model.train(was_training)
    return [_summarise(name, layer, accs[name]) for name, layer in layers]


def _summarise(name: str, layer: nn.Module, acc: _Acc) -> dict:
    kind = _layer_kind(layer)
    out: dict = {"name": name, "kind": kind, "type": type(layer).__name__}
    if kind == "other":
        out["message"] = f"{type(layer).__name__}: no routing statistics available for this layer type"
        return out
    tokens = int(acc.sums["tokens"])
    if kind == "soft":
        N, E, P = acc.shape
        S = E * P
        ent = acc.mean("slot_dispatch_entropy")
        dmax, dmin = acc.mean("slot_dispatch_max"), acc.mean("slot_dispatch_min")
        mass = acc.mean("expert_combine_mass")
        top = acc.sums["expert_top_tokens"]
        cent = float(acc.mean("combine_entropy"))
        out.update(num_experts=E, slots_per_expert=P, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {
            "combine_weights_min_mean": float(acc.mean("combine_weights_min_mean")),
            "combine_weights_max_mean": float(acc.mean("combine_weights_max_mean")),
            "dispatch_weights_min_mean": float(acc.mean("dispatch_weights_min_mean")),
            "dispatch_weights_max_mean": float(acc.mean("dispatch_weights_max_mean")),
            "combine_entropy_mean": cent,
            "combine_entropy_normalized_mean": cent / math.log(S) if S > 1 else 0.0,
            "dispatch_entropy_mean": float(ent.mean()),
            "dispatch_entropy_normalized_mean": float(ent.mean()) / math.log(N) if N > 1 else 0.0,
        }
        out["slots"] = [{"slot": s, "expert": s // P, "slot_in_expert": s % P,
                         "dispatch_entropy": float(ent[s]),
                         "dispatch_entropy_normalized": float(ent[s]) / math.log(N) if N > 1 else 0.0,
                         "dispatch_max": float(dmax[s]), "dispatch_min": float(dmin[s])} for s in range(S)]
        out["experts"] = [{"expert": e, "combine_mass": float(mass[e]), "top_combine_tokens": int(top[e]),
                           "top_combine_fraction": float(top[e]) / max(tokens, 1)} for e in range(E)]
    elif kind == "tokens_choice":
        N, E, K = acc.shape
        load, choices, gate = acc.mean("expert_load"), acc.mean("expert_choices"), acc.mean("expert_mean_gate")
        out.update(num_experts=E, k=K, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {"dropped_choices_fraction": float(acc.mean("dropped_choices_fraction")),
                          "tokens_unprocessed_fraction": float(acc.mean("tokens_unprocessed_fraction"))}
        out["experts"] = [{"expert": e, "load": float(load[e]), "choices": float(choices[e]),
                           "mean_gate": float(gate[e])} for e in range(E)]
    else:
        N, E, C = acc.shape
        sel, gate = acc.mean("expert_selected_gate"), acc.mean("expert_mean_gate")
        out.update(num_experts=E, capacity=C, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {"tokens_unprocessed_fraction": float(acc.mean("tokens_unprocessed_fraction")),
                          "experts_per_token_mean": float(acc.mean("experts_per_token_mean")),
                          "experts_per_token_max_mean": float(acc.mean("experts_per_token_max"))}
        out["experts"] = [{"expert": e, "selected_gate_mean": float(sel[e]), "mean_gate": float(gate[e])}
                          for e in range(E)]
    return out
