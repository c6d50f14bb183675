"""A validation split held out of the training set: deterministic and class-stratified.

    train_ds, val_ds = split_train_val(train_ds, 0.1)

Every class gives round(fraction * its count) images (at least one when it has two or more),
chosen by a fixed permutation (seed VAL_SEED, independent of the run's seed), so every model and
every seed of a comparison is tuned on the same validation images and trains on the same rest.
"""
from __future__ import annotations

import torch

from .dataset import ImageDataset

VAL_SEED = 0  # the split is part of the data, not of a run: the same for every run


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = VAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices), both sorted, a partition of range(len(labels)). labels (N,) int."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"val_split must be a fraction in (0, 1), got {fraction!r}")
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    val = []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()  # (n_c,)
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 else 0), len(idx) - 1)  # keep >= 1 image of the class for training
        perm = torch.randperm(len(idx), generator=g)
        val.append(idx[perm[:k]])
    val_idx = torch.cat(val).sort().values if val else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().flatten(), val_idx


def split_train_val(ds: ImageDataset, fraction: float) -> tuple[ImageDataset, ImageDataset]:
    """The training set without its validation part, and that part (split "val")."""
    tr, va = stratified_split(ds.labels, fraction)
    if len(va) == 0:
        raise ValueError(f"val_split={fraction!r} holds out no image of {ds.name!r} ({len(ds)} training images)")
    sub = lambda idx, split: ImageDataset(ds.images[idx], ds.labels[idx], ds.classes, ds.name, split)  # noqa: E731
    return sub(tr, "train"), sub(va, "val")
