"""The whole evaluation of one model: top-1/top-5 on a split and few-shot linear probes,
from tensors (no file or dataset I/O here, so it is testable with tiny stand-in models)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .classify import predict, topk_accuracy
from .fewshot import fewshot_evaluate, select_fewshot


def evaluate_model(model: nn.Module, test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                   train_images: torch.Tensor | None = None, train_labels: torch.Tensor | None = None,
                   shots: Sequence[int] = (), seed: int = 0, batch_size: int = 256,
                   prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   device: str | torch.device | None = None, bf16: bool = False,
                   classes: Sequence[str] | None = None, l2_regs: Sequence[float] | None = None) -> dict:
    """Top-k accuracy of `model`'s logits on (test_images (M,C,H,W), test_labels (M,)) and,
    when `shots` is non-empty, few-shot ridge accuracies on its pre-logits, with the few-shot
    sets drawn (seeded) from (train_images, train_labels).

    Returns {"num_test", "num_classes", "top1", "top5" (only when num_classes >= 5; both only
    when the model's head has num_classes outputs, else a "note" says why),
    "fewshot": {shots: {"accuracy", "l2", ...}}, "seconds"}.
    Raises ValueError (naming the class and its count) when a class has fewer train images
    than the largest shot count, before any forward pass.
    """
    shots = sorted(set(shots))
    test_labels = torch.as_tensor(test_labels).long()
    if test_labels.numel() and (int(test_labels.min()) < 0 or int(test_labels.max()) >= num_classes):
        raise ValueError(f"test labels must lie in [0, {num_classes}), got range "
                         f"[{int(test_labels.min())}, {int(test_labels.max())}]")
    selection = None
    if shots:
        if train_images is None or train_labels is None:
            raise ValueError("few-shot evaluation needs train_images and train_labels")
        # Validate the class counts first: a too-large shot count must fail fast.
        selection = select_fewshot(train_labels, max(shots), num_classes, seed, classes)  # (C, max_shots)
    t0 = time.perf_counter()
    out_test = predict(model, test_images, batch_size, prepare, device, bf16, logits=True, pre_logits=bool(shots))
    result: dict = {"num_test": int(test_labels.numel()), "num_classes": int(num_classes)}
    num_outputs = out_test["logits"].shape[1]
    if num_outputs == num_classes:
        result.update(topk_accuracy(out_test["logits"], test_labels, (1, 5)))
        if num_classes < 5:
            result["note"] = f"top-5 not reported: the dataset has {num_classes} < 5 classes"
    else:
        # A transfer evaluation (e.g. few-shot on another dataset): the head does not apply.
        result["note"] = (f"top-1/top-5 not reported: the model has {num_outputs} outputs but the dataset has "
                          f"{num_classes} classes (few-shot results still apply)")
    if shots:
        idx = selection.reshape(-1)
        feats = predict(model, train_images[idx], batch_size, prepare, device, bf16, logits=False)["pre_logits"]
        feats = feats.view(selection.shape[0], selection.shape[1], -1)  # (C, max_shots, D)
        result["fewshot"] = fewshot_evaluate(feats, out_test["pre_logits"], test_labels, shots, l2_regs)
    result["seconds"] = time.perf_counter() - t0
    return result
