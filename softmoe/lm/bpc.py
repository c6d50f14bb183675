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
def bpc_teacher_forced(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """windows (W, T+1) int64 -> mean bits per character over all W*T predictions."""
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = model(w[:, :-1])  # (b, T, V)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count / math.log(2)


@torch.no_grad()
def bpc_prefix_only(model, windows: torch.Tensor, batch_size: int = 64) -> float:
    """The same predictions, position t from a forward over w[:, :t+1] alone (T forwards)."""
    total, count = 0.0, 0
    T = windows.shape[1] - 1
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        for t in range(T):
            logits = model(w[:, :t + 1])[:, -1]  # (b, V)
            total += float(F.cross_entropy(logits.float(), w[:, t + 1], reduction="sum"))
            count += len(w)
    return total / count / math.log(2)
