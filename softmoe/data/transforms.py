"""Batched image transforms on uint8 (B, C, H, W) tensors: conversion to the model's input
(float in [-1, 1], resized) and the augmentation presets. Every random draw comes from an
explicit torch.Generator, so a batch is a pure function of the generator's seed.

Presets:
  - "inception_crop": the paper's random-resized crop (area fraction in [area_min, 1], aspect
    ratio log-uniform in [3/4, 4/3]) resized to img_size, plus a horizontal flip;
  - "crop_flip": pad by `padding` pixels (zeros), random crop back to the original size,
    horizontal flip; the usual recipe for small images;
  - "none": resize only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("inception_crop", "crop_flip", "none")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor of shape (B, C, H, W), got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (values 0..255), got {images.dtype}")


def _check_size(img_size) -> int:
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    return img_size


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` (drawn on the CPU) on `device` without a host sync: a CUDA copy goes through pinned
    memory and is asynchronous (a copy from pageable memory blocks the host until the device has
    finished its queued work). The random draws stay on the CPU so that a batch is the same on
    every device."""
    if device.type == "cpu" or t.device == device:
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _scale(x: torch.Tensor) -> torch.Tensor:
    """float 0..255 -> [-1, 1]."""
    return x * (2.0 / 255.0) - 1.0


def to_model_input(images: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, img_size, img_size) in [-1, 1]; bilinear resize
    (antialiased when shrinking) only when the size differs."""
    _check_images(images)
    _check_size(img_size)
    x = images.float()
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0)
    return _scale(x)


def _check_rows(rows, b: int) -> tuple[int, int, int]:
    """(start, stop, batch) of `rows` (None: the whole batch of b images)."""
    if rows is None:
        return 0, b, b
    ok = isinstance(rows, tuple) and len(rows) == 3 and all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in rows)
    if not ok or not (0 <= rows[0] <= rows[1] <= rows[2]) or rows[1] - rows[0] != b:
        raise ValueError(f"rows must be (start, stop, batch) with 0 <= start <= stop <= batch and stop - start = "
                         f"the number of images ({b}), got {rows!r}")
    return rows


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = True,
                     rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> uint8 (B, C, H, W): zero-pad by `padding`, take a random HxW window
    per image, flip half of them horizontally (if `flip`). One gather, no per-image loop.
    `rows` (start, stop, batch): `images` are rows start..stop-1 of a batch of `batch` images;
    the draws are those of the whole batch, so the output is bitwise those rows of its output."""
    _check_images(images)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    b, c, h, w = images.shape
    lo, hi, n = _check_rows(rows, b)
    dev = images.device
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)[lo:hi]
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)[lo:hi]
    flipped = (torch.rand(n, generator=generator) < 0.5)[lo:hi]
    if not flip:
        flipped = torch.zeros_like(flipped)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    rows = oy[:, None] + torch.arange(h)  # (B, H)
    cols = ox[:, None] + torch.arange(w)  # (B, W)
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows, cols = to_device(torch.cat([rows, cols], 1), dev).split([h, w], 1)  # one copy
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C): advanced dims first
    return out.permute(0, 3, 1, 2).contiguous()


def inception_crop_params(batch: int, generator: torch.Generator, area_min: float = 0.05, area_max: float = 1.0,
                          ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True) -> torch.Tensor:
    """Affine matrices (B, 2, 3) for F.affine_grid mapping output coords to a random crop box
    (normalised coords in [-1, 1]). A box that would exceed the image on one side is clamped to
    the full extent on that side (TF's sampler retries and then falls back to the whole image;
    clamping keeps it one batched draw)."""
    if not 0 < area_min <= area_max <= 1:
        raise ValueError(f"need 0 < area_min <= area_max <= 1, got area_min={area_min}, area_max={area_max}")
    area = torch.empty(batch).uniform_(area_min, area_max, generator=generator)
    log_r = torch.empty(batch).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)  # crop width as a fraction of the image width
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (w / 2) + torch.rand(batch, generator=generator) * (1 - w)  # centre in [0, 1]
    cy = (h / 2) + torch.rand(batch, generator=generator) * (1 - h)
    sign = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(batch)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    return theta


def inception_crop(images: torch.Tensor, img_size: int, generator: torch.Generator, area_min: float = 0.05,
                   flip: bool = True, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, img_size, img_size) in [-1, 1]: random-resized crop
    (bilinear, via one batched grid_sample) with an optional horizontal flip. `rows`: as
    `random_crop_flip` (the crop boxes of the whole batch are drawn, these rows' are applied)."""
    _check_images(images)
    _check_size(img_size)
    b, c = images.shape[:2]
    lo, hi, n = _check_rows(rows, b)
    theta = to_device(inception_crop_params(n, generator, area_min=area_min, ratio=ratio, flip=flip)[lo:hi],
                      images.device)
    grid = F.affine_grid(theta, [b, c, img_size, img_size], align_corners=False)
    x = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return _scale(x)


def augment(images: torch.Tensor, preset: str, img_size: int, generator: torch.Generator, padding: int | None = None,
            area_min: float = 0.05, flip: bool = True, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Apply augmentation `preset` (one of AUGMENTATIONS) and convert to the model's input:
    uint8 (B, C, H, W) -> float32 (B, C, img_size, img_size) in [-1, 1]. `padding` for
    crop_flip defaults to 1/8 of the image side (4 px at 32, 1 px at 8). `flip=False` turns off the
    horizontal flip of both presets (digits and text are not mirror-symmetric). `rows`
    (start, stop, batch): `images` are those rows of a batch of `batch`; the output is bitwise
    those rows of the whole batch's (per-rank data: each rank augments only its own rows)."""
    _check_rows(rows, images.shape[0])
    if preset == "none":
        return to_model_input(images, img_size)
    if preset == "crop_flip":
        pad = max(1, images.shape[-1] // 8) if padding is None else padding
        return to_model_input(random_crop_flip(images, pad, generator, flip=flip, rows=rows), img_size)
    if preset == "inception_crop":
        return inception_crop(images, img_size, generator, area_min=area_min, flip=flip, rows=rows)
    raise ValueError(f"augment must be one of {list(AUGMENTATIONS)}, got {preset!r}")
