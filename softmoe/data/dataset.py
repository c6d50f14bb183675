"""The in-memory image dataset every loader in `softmoe.data` returns.

Small vision datasets (digits, MNIST, CIFAR, SVHN) fit in memory as uint8: CIFAR-10 train is
50000*3*32*32 = 150 MB. Holding them decoded lets the training loop gather a batch with one
index operation and augment it with batched tensor ops, with no per-image Python work.
"""
from __future__ import annotations

import torch


class ImageDataset:
    """Images as one uint8 tensor (N, C, H, W), labels int64 (N,), class names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], name: str,
                 split: str = "train", skipped: int = 0) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels (N, C, H, W), got shape {tuple(images.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be a tensor of shape ({images.shape[0]},), got "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if not classes:
            raise ValueError("classes must be a non-empty list of class names")
        labels = labels.to(torch.int64)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)}), got range "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.labels = labels  # (N,) int64
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.skipped = skipped  # unreadable files skipped while loading (ImageFolder with skip_bad)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        c, (h, w) = self.channels, self.image_size
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape=({c}, {h}, {w}), classes={self.num_classes})")
