"""Optimiser and learning-rate schedules of the paper's recipe (docs/design.md §4).

Weight decay is decoupled and scaled by the learning rate, as big_vision/vmoe apply it
(update = -lr_t * (adam_direction + wd * param)), which is exactly torch's AdamW with
`weight_decay=wd`. Parameters named by `model.no_weight_decay()` (router phi, biases, norms,
position embedding) get none; the head kernel can have its own decay (paper: 3.0).

Schedules are pure functions of the step, so resuming needs only the step number.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .config import TrainConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameter names without weight decay: model.no_weight_decay() if the model defines it,
    else every parameter with fewer than 2 dims (biases, norm scales) and names ending in
    pos_embed / phi."""
    if hasattr(model, "no_weight_decay"):
        names = set(model.no_weight_decay())
        unknown = names - {n for n, _ in model.named_parameters()}
        if unknown:
            raise ValueError(f"model.no_weight_decay() names parameters the model lacks: {sorted(unknown)[:5]}")
        return names
    return {n for n, p in model.named_parameters()
            if p.dim() < 2 or n.endswith(("pos_embed", "phi"))}


def head_kernel_names(model: nn.Module) -> set[str]:
    """The classifier kernel: `head.weight` (the zoo's nn.Linear head)."""
    return {n for n, _ in model.named_parameters() if n == "head.weight"}


def param_groups(model: nn.Module, weight_decay: float, head_weight_decay: float | None = None) -> list[dict]:
    """Groups "decay" (weight_decay), "head" (head_weight_decay, if given) and "no_decay" (0);
    each holds its parameter names too, for logging and tests. Frozen parameters are skipped."""
    skip = no_decay_names(model)
    head = head_kernel_names(model) if head_weight_decay is not None else set()
    groups = {"decay": ([], [], weight_decay), "head": ([], [], head_weight_decay or 0.0), "no_decay": ([], [], 0.0)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "no_decay" if name in skip else "head" if name in head else "decay"
        groups[key][0].append(p)
        groups[key][1].append(name)
    return [{"params": ps, "param_names": names, "weight_decay": wd, "name": key}
            for key, (ps, names, wd) in groups.items() if ps]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.head_weight_decay)
    for g in groups:
        del g["param_names"]  # torch's state_dict keeps extra keys; names would bloat train_state.pt
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, **kwargs)  # weight decay as L2 added to the gradient
    raise ValueError(f"optimizer must be 'adamw' or 'adam', got {cfg.optimizer!r}")


def make_schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """lr(step) for step in [0, total_steps). Warmup (big_vision): peak * step / warmup_steps.

    rsqrt: peak / sqrt(1 + (step - warmup) / timescale) after warmup, times a linear cooldown
    factor min(1, (total - step) / cooldown_steps) over the last cooldown_steps.
    cosine: peak -> min_lr along half a cosine from warmup to total. constant: peak."""
    peak, warmup = cfg.lr, cfg.warmup_steps
    if warmup >= total_steps and total_steps > 0 and cfg.schedule != "constant":
        raise ValueError(f"warmup_steps={warmup} must be smaller than the run's {total_steps} steps")
    if cfg.cooldown_steps > total_steps:
        raise ValueError(f"cooldown_steps={cfg.cooldown_steps} exceeds the run's {total_steps} steps")
    kind, timescale, cooldown, min_lr = cfg.schedule, cfg.rsqrt_timescale, cfg.cooldown_steps, cfg.min_lr

    def lr(step: int) -> float:
        if warmup and step < warmup:
            return peak * step / warmup
        if kind == "constant":
            return peak
        if kind == "rsqrt":
            value = peak / math.sqrt(1.0 + (step - warmup) / timescale)
            if cooldown:
                value *= min(1.0, (total_steps - step) / cooldown)
            return value
        if kind == "cosine":
            progress = (step - warmup) / max(1, total_steps - warmup)
            return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        raise ValueError(f"schedule must be 'rsqrt', 'cosine' or 'constant', got {kind!r}")

    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
