"""Batched inference for evaluation: logits and pre-logits of a model on a stack of images,
and top-k accuracy.

The model surface used is the zoo's: `forward_features(x (B,C,H,W)) -> (B,N,D)` then
`forward_head(tokens, pre_logits=True) -> (B,D)` (the few-shot features, docs/design.md §5) and
`forward_head(tokens) -> (B,num_classes)` (the logits). One feature pass gives both.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from softmoe._device import resolve_device


def _autocast(device: torch.device, bf16: bool):
    # bf16 autocast only where it is fast and supported; the routing inside the MoE layers
    # stays float32 by construction (docs/design.md §1, Precision).
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, device: str | torch.device | None = None,
            bf16: bool = False, logits: bool = True, pre_logits: bool = True) -> dict[str, torch.Tensor]:
    """Run `model` in eval mode over `images` (M, C, H, W) in batches.

    prepare: maps one batch of `images` (e.g. uint8) to model input (float (b, C, img, img));
      None = use the batch as is.
    device: where to run (the model is moved there); None = where the model is.
    Returns {"logits": (M, num_classes) float32, "pre_logits": (M, D) float32} on the CPU
    (those asked for). The model's train/eval mode is restored afterwards.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (logits or pre_logits):
        raise ValueError("predict needs logits=True or pre_logits=True")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    model_device = next(model.parameters()).device
    if model_device != dev:
        model.to(dev)
    outs: dict[str, list[torch.Tensor]] = {"logits": [], "pre_logits": []}
    try:
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            x = prepare(batch) if prepare is not None else batch
            x = x.to(dev, non_blocking=True)
            with _autocast(dev, bf16):
                tokens = model.forward_features(x)  # (b, N, D)
                if pre_logits:
                    outs["pre_logits"].append(model.forward_head(tokens, pre_logits=True).float().cpu())
                if logits:
                    outs["logits"].append(model.forward_head(tokens).float().cpu())
    finally:
        model.train(was_training)
    return {k: torch.cat(v) for k, v in outs.items() if v}


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{"top1": ..., "top5": ...} for logits (M, C) and int labels (M,). A k larger than the
    number of classes C is left out (top-k with k >= C is trivially 1)."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (M, C) and labels (M,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty split")
    num_classes = logits.shape[1]
    labels = labels.long().to(logits.device)
    valid = [k for k in ks if k <= num_classes]
    out = {}
    if valid:
        top = logits.topk(max(valid), dim=1).indices  # (M, kmax)
        hit = top == labels.unsqueeze(1)  # (M, kmax)
        for k in valid:
            out[f"top{k}"] = float(hit[:, :k].any(1).double().mean())
    return out
