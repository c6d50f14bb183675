"""Trained models that ship with softmoe, loaded by name, offline.

    from softmoe.models import from_pretrained, list_pretrained
    list_pretrained()                                   # {name: card}
    model = from_pretrained("cifar10_soft_moe_micro_p8")   # no download: package data
    softmoe eval --checkpoint cifar10_soft_moe_micro_p8 --data-root ../shared/datasets/cifar10

Each model is a `save_pretrained` directory in the package folder `pretrained_weights/<name>/`
(config.json, model.safetensors, and the run's train_config.json, so that `softmoe eval` knows its
dataset), described by one entry of `pretrained_weights/index.json`, its *card*: what was trained
(model, recipe, seed, the command), the accuracy it reached (validation and test, from the study
record it was trained with) and the sha256 of its weights file, checked on every load, so that a
damaged or replaced file is an error, never a silently different model.

A name is resolved only when no file or directory of that name exists: a path always wins.
Where the numbers come from: docs/results.md (CIFAR-10 study 2, 30 epochs).

Adding a model (maintainers, from the repository root of an editable install):
`python -c "from softmoe.models.pretrained import add; add(NAME, CHECKPOINT, RECORD, DESCRIPTION)"`
copies the checkpoint's model (re-saved as float32 save_pretrained files) and writes its card from
RECORD (a study record under docs/results/, path relative to the repository root), which must be
the record of the run that wrote CHECKPOINT (same model, seed, budget and data).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import sha256_file

ROOT = Path(__file__).resolve().parent / "pretrained_weights"
INDEX = "index.json"
TRAIN_CONFIG = "train_config.json"


def list_pretrained() -> dict[str, dict]:
    """{name: card} of every shipped model, by name. A card: description, model, overrides,
    data, seed, steps, val_accuracy, test_accuracy (fractions), num_val, num_test, record,
    command, weights_sha256."""
    path = ROOT / INDEX
    if not path.is_file():
        return {}
    index = json.loads(path.read_text(encoding="utf-8"))
    return {name: index[name] for name in sorted(index)}


def pretrained_dir(name: str) -> Path:
    """The directory of shipped model `name`, its weights checked against the card's sha256.
    ValueError naming the known models if there is no such model, or if its file is damaged."""
    cards = list_pretrained()
    if name not in cards:
        raise ValueError(f"no shipped model named {name!r}; shipped models: {sorted(cards) or 'none'} "
                         f"(or give a directory written by save_pretrained)")
    from .hub import WEIGHTS_NAME

    directory = ROOT / name
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"shipped model {name!r}: {weights} is missing (a broken installation?)")
    digest = sha256_file(weights)
    if digest != cards[name]["weights_sha256"]:
        raise ValueError(f"shipped model {name!r}: {weights} has sha256 {digest}, its card says "
                         f"{cards[name]['weights_sha256']} (the file is damaged or was replaced); reinstall softmoe")
    return directory


def resolve(path):
    """`path` unchanged if it exists on disk or is not a shipped model's name; else the shipped
    model's (checked) directory. What `from_pretrained`, `load_model` and `softmoe eval` call."""
    if isinstance(path, (str, os.PathLike)) and not os.path.exists(path) and os.fspath(path) in list_pretrained():
        return pretrained_dir(os.fspath(path))
    return path


def add(name: str, checkpoint, record, description: str, root: Path = ROOT) -> dict:
    """Ship the model of `checkpoint` (a checkpoint or save_pretrained directory) as `name`,
    with its card from `record` (a `softmoe compare` run record); returns the card. The record
    must describe the run that wrote the checkpoint: same model, overrides and seed."""
    from softmoe._io import atomic_write_json

    from .hub import WEIGHTS_NAME, load_model, save_pretrained

    if not name.isidentifier():
        raise ValueError(f"name must be an identifier (letters, digits, _), got {name!r}")
    rec = json.loads(Path(record).read_text(encoding="utf-8"))
    model, train_cfg = load_model(checkpoint)
    if train_cfg is None:
        raise ValueError(f"{checkpoint}: no training config next to the model; ship a training checkpoint")
    cfg = rec["config"]
    for key in ("model", "seed", "epochs", "steps", "data"):
        if train_cfg.get(key) != cfg.get(key):
            raise ValueError(f"record {record} does not describe checkpoint {checkpoint}: {key} is "
                             f"{cfg.get(key)!r} there, {train_cfg.get(key)!r} in the checkpoint")
    summary = rec["summary"]
    out = Path(root) / name
    save_pretrained(model.float(), out)
    atomic_write_json(out / TRAIN_CONFIG, train_cfg, sort_keys=True)
    card = {"description": description, "model": cfg["model"]["name"], "overrides": cfg["model"]["overrides"],
            "data": cfg["data"], "seed": cfg["seed"], "steps": summary["steps"],
            "val_accuracy": summary["val_accuracy"], "test_accuracy": summary["test_accuracy"],
            "num_val": int(rec["examples"]["val"]), "num_test": int(rec["examples"]["test"]),
            "record": str(record), "weights_sha256": sha256_file(out / WEIGHTS_NAME)}
    index_path = Path(root) / INDEX
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    index[name] = card
    atomic_write_json(index_path, index, indent=1, sort_keys=True)
    return card

