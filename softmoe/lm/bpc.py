"""Bits per character, two ways. Teacher-forced: one forward over each window, every position
scored at once. Prefix-only: position t scored by a forward over tokens <= t alone (as
generation sees them). A causal model gives the same number both ways (to float rounding);
a model whose outputs read the future (the plain SoftMoE in a decoder) scores better
teacher-forced than prefix-only: the gap measures the leak."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def window_bits_teacher_forced(model, windows: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """windows (W, T+1) int64 -> (W,) float64: each window's mean bits per character over its
    T predictions (the per-window values the paired bootstrap of softmoe/compare/lm.py resamples)."""
    out = []
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])  # (b, T, V)
        nats = F.cross_entropy(logits.transpose(1, 2).float(), w[:, 1:], reduction="none")  # (b, T)
        out.append(nats.double().sum(1))
    return torch.cat(out) / (windows.shape[1] - 1) / math.log(2)


@torch.no_grad()
def window_bits_prefix_only(model, windows: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The same (W,) values, position t from a forward over w[:, :t+1] alone (T forwards)."""
    out = []
    T = windows.shape[1] - 1
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        nats = torch.zeros(len(w), dtype=torch.float64)
        for t in range(T):
            logits = model(w[:, :t + 1])[:, -1]  # (b, V)
            nats += F.cross_entropy(logits.float(), w[:, t + 1], reduction="none").double()
        out.append(nats)
    return torch.cat(out) / T / math.log(2)


def bpc_teacher_forced(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """windows (W, T+1) int64 -> mean bits per character over all W*T predictions."""
    return float(window_bits_teacher_forced(model, windows, batch_size).mean())


def bpc_prefix_only(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """The same predictions, position t from a forward over w[:, :t+1] alone (T forwards)."""
    return float(window_bits_prefix_only(model, windows, batch_size).mean())
