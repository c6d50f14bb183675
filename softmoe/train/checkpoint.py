"""Training checkpoints that survive a crash.

Layout: WORKDIR/checkpoints/step_00001234/ holding
  config.json + model.safetensors  a save_pretrained directory (from_pretrained loads it)
  train_config.json                the run's TrainConfig (so the directory stands alone)
  train_state.pt                   step, optimizer state, RNG states; torch.load(weights_only=True)

A checkpoint is written into a hidden temporary directory and renamed into place; a directory
named step_* is therefore always complete, and a crash mid-write leaves only a `.tmp-*`
directory that `latest_checkpoint` ignores and the next save removes. The layout and the
loading of a model from it live in softmoe.models.hub (evaluation needs no softmoe.train).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from softmoe.models.hub import (CHECKPOINTS, TRAIN_CONFIG, TRAIN_STATE, checkpoint_dir,  # noqa: F401 (re-exported)
                                latest_checkpoint, list_checkpoints, load_model, save_pretrained)


# -- RNG state as plain tensors and numbers (loadable with weights_only=True) ----------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- writing -----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(workdir: str | os.PathLike, step: int, model: nn.Module, train_state: dict,
                    train_config: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    root = Path(workdir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(workdir, step)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_pretrained(model, tmp)
        with open(tmp / TRAIN_CONFIG, "w", encoding="utf-8") as f:
            json.dump(train_config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / TRAIN_STATE, "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (rename cannot replace a non-empty dir)
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old_dir in list_checkpoints(workdir)[:-keep]:
        shutil.rmtree(old_dir, ignore_errors=True)
    return final


def load_train_state(checkpoint: str | os.PathLike) -> dict:
    """The training state of `checkpoint` (loaded with weights_only=True: nothing is
    unpickled); a truncated or foreign file is a ValueError naming it."""
    path = Path(checkpoint) / TRAIN_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(checkpoint)!r} is not a training checkpoint")
    state = load_state_file(path, "training state")
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{str(path)!r} is not a softmoe training state: it has no step")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{str(path)!r} is not a softmoe training state: step={step!r}")
    return state


def load_state_file(path: Path, what: str):
    """A file of `torch.save`d tensors, numbers and dicts (train_state.pt, a rank's RNG state),
    loaded with weights_only=True: nothing is unpickled. Unreadable: ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable {what}: truncated, corrupt or not written by "
                         f"softmoe ({type(e).__name__}; it is loaded with weights_only=True, never unpickled)") from e


def load_model_weights(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load `checkpoint`'s model.safetensors into `model` (resume): keys and shapes must match,
    and each tensor must have the dtype of the model's tensor or one that casts to it
    losslessly (float16 -> float32); anything else is a ValueError naming the tensor."""
    from softmoe.models.hub import WEIGHTS_NAME, check_dtypes, load_safetensors, load_weights

    path = Path(checkpoint) / WEIGHTS_NAME
    expected = {key: value.dtype for key, value in model.state_dict().items()}
    load_weights(model, check_dtypes(load_safetensors(path), str(path), expected), source=str(path))


def read_run_config(path: str | os.PathLike) -> dict:
    """A work directory's config.json as a dict; unreadable or not an object: ValueError naming it."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); restore it or use another --workdir") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object (the run's config), got {type(doc).__name__}")
    return doc
