"""Deterministic training batches: the batch of step `s` is a pure function of (seed, s).

Epoch e = s // steps_per_epoch uses the permutation drawn from seed (seed, e); the batch is a
slice of it (the last partial batch of an epoch is dropped, so every batch has the same size).
Augmentation draws from a generator seeded by (seed, s). Resuming at step s therefore needs
no loader state beyond s, and a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import torch

from .dataset import ImageDataset
from .transforms import AUGMENTATIONS, augment, to_device, to_model_input

_PERM, _AUG = 0, 1  # stream identifiers, so the two kinds of draws never share a seed


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers, stable across platforms and numpy versions (SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class TrainBatches:
    """Random, augmented batches of `dataset` for step numbers 0, 1, 2, ..."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, img_size: int, augment: str = "none",
                 padding: int | None = None, area_min: float = 0.05, flip: bool = True,
                 device: str | torch.device = "cpu") -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > len(dataset):
            raise ValueError(f"batch_size={batch_size} is larger than the {dataset.name!r} {dataset.split} split "
                             f"({len(dataset)} images); use batch_size <= {len(dataset)}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {augment!r}")
        if padding is not None and padding > max(dataset.image_size):
            raise ValueError(f"padding (config: crop_padding) must be <= the image side {max(dataset.image_size)}, "
                             f"got {padding}: a crop would show only padding")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = int(seed)
        self.img_size = img_size
        self.augment = augment
        self.padding = padding
        self.area_min = area_min
        self.flip = flip
        self.device = torch.device(device)
        self.steps_per_epoch = len(dataset) // batch_size
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation (len(dataset),), drawn on the CPU (the same on every device)
        and kept on the dataset's device: one asynchronous copy per epoch, so that indexing a
        GPU-resident dataset never copies a CPU index (a blocking transfer) in a step."""
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, _PERM, epoch))
            self._perm = to_device(torch.randperm(len(self.dataset), generator=g), self.dataset.images.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        """Dataset indices (batch_size,) of step `step`, on the dataset's device."""
        epoch, b = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[b * self.batch_size:(b + 1) * self.batch_size]

    def batch(self, step: int, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 (B, C, img, img) in [-1, 1], labels int64 (B,)) on `device`.
        `rows` (start, stop): only rows start..stop-1 of that batch, (stop - start, ...),
        bitwise equal to them; only those images are gathered and augmented (a rank's share)."""
        idx = self.indices(step)
        B = len(idx)
        if rows is None:
            rows = (0, B)
        if not (isinstance(rows, tuple) and len(rows) == 2 and all(isinstance(v, int) for v in rows)
                and 0 <= rows[0] < rows[1] <= B):
            raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= batch_size={B}, got {rows!r}")
        lo, hi = rows
        idx = idx[lo:hi]
        images = to_device(self.dataset.images[idx], self.device)  # (b, C, H, W) uint8
        labels = to_device(self.dataset.labels[idx], self.device)
        g = torch.Generator().manual_seed(derive_seed(self.seed, _AUG, step))
        x = augment(images, self.augment, self.img_size, g, padding=self.padding, area_min=self.area_min,
                    flip=self.flip, rows=(lo, hi, B))
        return x, labels


def eval_batches(dataset: ImageDataset, batch_size: int, img_size: int, device: str | torch.device = "cpu"):
    """Yield (images float32 (B, C, img, img), labels (B,)) over the whole dataset in order, no augmentation."""
    device = torch.device(device)
    for i in range(0, len(dataset), batch_size):
        images = dataset.images[i:i + batch_size].to(device)
        yield to_model_input(images, img_size), dataset.labels[i:i + batch_size].to(device)
