"""What the `eval` and `inspect` commands share: loading a model from a training workdir,
a checkpoint directory or a save_pretrained directory, choosing the dataset, and turning
uint8 images into the model's input."""
from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable

import torch
from torch import nn


def check_model_dir(path: str | os.PathLike, arg: str = "--checkpoint") -> Path:
    """`path` as a Path if it is a directory (or the directory of the shipped model it names);
    else the CLI error naming argument `arg`."""
    from softmoe.models.pretrained import resolve

    p = Path(resolve(path))
    if not p.exists():
        raise FileNotFoundError(f"{arg} {str(path)!r} does not exist (give a training workdir, a "
                                f"checkpoints/step_* directory or a save_pretrained directory)")
    if not p.is_dir():
        raise ValueError(f"{arg} {str(path)!r} is a file; give its directory (a training workdir, a "
                         f"checkpoints/step_* directory or a save_pretrained directory)")
    return p


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict | None]:
    """(model in eval mode, training config dict or None) for a training workdir (its latest
    checkpoint), a checkpoint directory or a save_pretrained directory."""
    p = check_model_dir(path)
    from softmoe.models.hub import load_model

    model, train_cfg = load_model(p)
    model.eval()
    return model, train_cfg


def resolve_data(data: str | None, data_root: str | None, train_cfg: dict | None) -> tuple[str, str | None]:
    """(dataset name, root): the --data argument, else the dataset recorded in the training
    config (with its data_root unless --data-root is given)."""
    if data:
        return data, data_root
    if train_cfg and train_cfg.get("data"):
        return str(train_cfg["data"]), data_root if data_root else train_cfg.get("data_root")
    from softmoe.data import DATASETS

    raise ValueError(f"--data is required: the checkpoint records no training dataset; choose one of "
                     f"{list(DATASETS)} or give an ImageFolder directory")


def make_prepare(model: nn.Module, channels: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (B, C, H, W) batch -> the model's input (B, in_chans, img, img) in [-1, 1], in the
    dtype of its patch embedding (a bfloat16 checkpoint gets bfloat16 input).
    Grayscale data for an RGB model is repeated over 3 channels (the usual convention)."""
    from softmoe.data import to_model_input

    cfg = model.config
    in_chans, img_size = int(cfg.in_chans), int(cfg.img_size)
    dtype = model.patch_embed.proj.weight.dtype  # a bfloat16 checkpoint gets bfloat16 input
    if channels != in_chans and not (channels == 1 and in_chans == 3):
        raise ValueError(f"the dataset has {channels}-channel images but the model expects in_chans={in_chans}")

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        x = to_model_input(batch, img_size).to(dtype)  # (B, C, img, img) in [-1, 1]
        return x.expand(-1, 3, -1, -1) if x.shape[1] != in_chans else x

    return prepare
