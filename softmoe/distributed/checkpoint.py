"""Layout-independent sharded checkpoints on `torch.distributed.checkpoint` (DCP): save at one
layout (dp x ep, FSDP2 or not), load at any other, or into an unparallelised model in a single
process without any process group (same state_dict keys).

A checkpoint is a folder:

    .metadata, __<rank>_<i>.distcp   DCP: every rank writes the shards it owns (replicated
                                     tensors once, spread over the ranks by DCP's planner)
    extra.json                       the caller's JSON data (step, ...), written by rank 0
    COMPLETE                         written last: a folder without it is not a checkpoint

`async_save_checkpoint` writes the same folder from a CPU snapshot in a background thread;
extra.json and COMPLETE come only with its `wait()`, after every rank's shards are on disk.

The state is {"model": model state_dict, "optim": optimizer state_dict} as
`torch.distributed.checkpoint.state_dict.get_state_dict` gives them (keyed by parameter name,
DTensor shards as DTensors), so nothing is gathered: no rank ever holds more than its own
parameters and optimizer state. No pickle anywhere (DCP's metadata is its own format).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from .._io import atomic_write_json, atomic_write_text
from .expert_parallel import local, local_region

FORMAT = "softmoe-dcp-checkpoint-v1"
EXTRA, MARKER, METADATA = "extra.json", "COMPLETE", ".metadata"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier(group=None) -> None:
    if _distributed():
        dist.barrier(group=group)


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _state(model: nn.Module, optimizer) -> dict:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None, process_group=None) -> Path:
    """Save `model` (and `optimizer`) into folder `path`; collective when a process group
    exists (every rank calls it), a plain single-process save otherwise. `extra`: JSON data
    (step, ...) returned by `load_checkpoint`. `process_group`: the group of all ranks that
    coordinates the save (e.g. `Mesh.io_group`, with a long timeout); None: the default one.
    Returns `path`."""
    path = _begin(path, process_group)
    dcp.save(_state(model, optimizer), checkpoint_id=str(path), process_group=process_group)
    return _finish(path, extra, optimizer is not None, process_group)


class PendingCheckpoint:
    """An `async_save_checkpoint` in flight: DCP writes a CPU snapshot of the state in a
    background thread. `wait()` (collective: every rank calls it) waits for the shards, then
    writes extra.json and the COMPLETE marker; until then the folder is not a checkpoint."""

    def __init__(self, path: Path, future, extra: dict | None, has_optimizer: bool, process_group) -> None:
        self.path, self._future, self._extra = path, future, extra
        self._has_optimizer, self._group = has_optimizer, process_group
        self._finished = False

    def done(self) -> bool:
        """True once the background write has ended (successfully or not); no communication."""
        return self._future.done()

    def wait(self) -> Path:
        """Finish the checkpoint (collective; once: later calls return `path`). The background
        save's error, if any, is raised here and the folder stays without COMPLETE."""
        if not self._finished:
            self._future.result()
            _finish(self.path, self._extra, self._has_optimizer, self._group)
            self._finished = True
        return self.path

    def abandon(self) -> None:
        """On an error path: let the background write end (it fails at the latest after the
        process group's timeout when a peer is gone), swallowing its error, and never write
        COMPLETE. No collective of this rank's own, so it cannot wait on a dead peer itself."""
        try:
            self._future.result()
        except BaseException:  # noqa: BLE001 -- the run is already failing with its own error
            pass
        self._finished = True


def async_save_checkpoint(path: str | os.PathLike, model: nn.Module,
                          optimizer: torch.optim.Optimizer | None = None, extra: dict | None = None,
                          process_group=None) -> PendingCheckpoint:
    """`save_checkpoint` in the background (`torch.distributed.checkpoint.async_save`, a thread):
    collective like it; the state is copied to CPU memory before this returns (DCP's staging),
    so the caller may update the model and optimizer at once. The shards are then written in
    the background, coordinated over `process_group` (it must be a CPU (gloo) group, e.g.
    `Mesh.io_group`; no other collective may run on it meanwhile). Call `wait()` on the result
    (every rank) to finish the checkpoint; until then it has no COMPLETE marker."""
    path = _begin(path, process_group)
    future = dcp.async_save(_state(model, optimizer), checkpoint_id=str(path), process_group=process_group)
    future = getattr(future, "upload_completion", future)  # an AsyncSaveResponse with async staging
    return PendingCheckpoint(path, future, extra, optimizer is not None, process_group)


def _begin(path: str | os.PathLike, process_group) -> Path:
    path = Path(path)
    if _rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).unlink(missing_ok=True)  # an overwritten checkpoint is incomplete until the end
    _barrier(process_group)
    return path


def _finish(path: Path, extra: dict | None, has_optimizer: bool, process_group) -> Path:
    """After DCP's save on every rank: extra.json, a barrier, then COMPLETE (rank 0)."""
    if _rank() == 0:
        atomic_write_json(path / EXTRA, {"format": FORMAT, "extra": extra or {}, "optimizer": has_optimizer})
    _barrier(process_group)  # every shard, DCP's metadata and the extra data are on disk
    if _rank() == 0:
        atomic_write_text(path / MARKER, FORMAT + "\n")
    _barrier(process_group)
    return path


def read_info(path: str | os.PathLike) -> dict:
    """{"format", "extra", "optimizer"} of the complete checkpoint folder `path`; ValueError if
    it is incomplete, foreign, or lacks a shard file that its metadata names."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker: unfinished or interrupted save)")
    try:
        info = json.loads((path / EXTRA).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / EXTRA} is unreadable ({e}): {path} is not a softmoe checkpoint") from e
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path / EXTRA}: format must be {FORMAT!r}, got "
                         f"{info.get('format') if isinstance(info, dict) else info!r}")
    missing = sorted(set(shard_files(path)) - {p.name for p in path.iterdir()})
    if missing:
        raise ValueError(f"checkpoint {path} is missing shard files {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"that its {METADATA} names (a partial copy?); it cannot be loaded")
    return info


def shard_files(path: str | os.PathLike) -> list[str]:
    """The data files the checkpoint's DCP metadata refers to."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    return sorted({info.relative_path for info in (metadata.storage_data or {}).values()})


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    process_group=None) -> dict:
    """Load a `save_checkpoint` folder into `model` (parallelised at any layout, FSDP2 or not,
    or a plain model in one process without a process group) and `optimizer` (built over
    `model`'s parameters, same groups). Each rank reads only what its shards need. Materialise
    a meta model first (`model.to_empty(device=...)`). Every model tensor must be in the
    checkpoint with its global shape. `process_group`: as for `save_checkpoint`. Returns the
    saved `extra` dict."""
    path = Path(path)
    info = read_info(path)
    if optimizer is not None and not info["optimizer"]:
        raise ValueError(f"checkpoint {path} holds no optimizer state")
    meta = [k for k, t in model.state_dict().items() if t.is_meta]
    if meta:
        raise ValueError(f"model tensors {meta[:3]} are on the meta device: call model.to_empty(device=...) first")
    state = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path), process_group=process_group)
    except Exception as e:  # DCP wraps per-rank failures (CheckpointException) and file errors
        raise ValueError(f"checkpoint {path} does not fit the model/optimizer or is damaged: {e}") from e
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=True))
    return info["extra"]


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load whole (unsharded) tensors, e.g. a single-process `model.safetensors`, into `model`
    at any layout: each rank copies its block (`local_region`) of every tensor; no
    communication. Keys and global shapes must match exactly (ValueError naming them)."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"state_dict keys differ from the model's: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in own.items():
        full = state_dict[key]
        if tuple(full.shape) != tuple(t.shape):
            raise ValueError(f"{key}: shape {tuple(full.shape)}, the model expects {tuple(t.shape)}")
        local(t).copy_(full[local_region(t)])


def shard_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A single-process optimizer `state_dict()` (whole tensors, parameters by index in the
    order of `optimizer.param_groups`, built the same way over `model`) cut to this rank's
    blocks: a state tensor of a DTensor parameter's global shape (Adam's moments) becomes a
    DTensor like the parameter holding its block; everything else is kept. No communication."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        p = params[int(index)]
        out["state"][index] = {
            k: DTensor.from_local(v[local_region(p)].clone().to(local(p).device), p.device_mesh, p.placements,
                                  run_check=False, shape=p.shape, stride=p.stride())  # uneven FSDP shards too
            if isinstance(p, DTensor) and torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
            for k, v in entry.items()}
    return out
