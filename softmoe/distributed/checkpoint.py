"""Layout-independent sharded checkpoints: save at one ep_size, load at any other, or into an
unparallelised model in a single process (same state_dict keys).

A checkpoint is a folder:

    model-rank00003.safetensors   what rank 3 owns: replicated tensors (rank 0 only) and, on
    optim-rank00003.safetensors   dp_rank 0, its expert shard; optimizer state alike
    index.json                    every tensor's global shape, dtype and shards (file, rows)
    COMPLETE                      written last: a folder without it is not a checkpoint

No rank ever holds more than its own parameters and optimizer state (nothing is gathered):
each rank writes its shard file (atomically, `softmoe._io.atomic_write`), rank 0 writes the
index from every rank's listing (a few hundred bytes each) and, after a barrier, the marker.
Loading reads only the rows a rank needs (safetensors slices) from the files that hold them.

Optimizer state is stored by parameter name: a state tensor of the parameter's (local) shape
is sharded like it (Adam's moments), anything else (Adam's step) is kept once. Parameter
groups are stored with parameter names instead of indices. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._io import atomic_write, atomic_write_json, atomic_write_text
from .expert_parallel import ExpertParallel
from .mesh import Mesh
from .parallelize import mesh_of

FORMAT = "softmoe-sharded-checkpoint-v1"
INDEX, MARKER = "index.json", "COMPLETE"


def _shard_ranges(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{state_dict key: (start, stop, global rows)} for every expert-parallel tensor."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, ExpertParallel):
            lo = module.expert_offset
            for name in module._parameters:
                out[f"{prefix}.{name}"] = (lo, lo + module.num_local_experts, module.num_experts)
    return out


def _owned(tensors: dict[str, torch.Tensor], ranges: dict, mesh: Mesh) -> dict[str, tuple]:
    """The entries this rank writes, {key: (tensor, start, stop, global shape)}: its expert
    shards if it is dp_rank 0 of its replicas, and on rank 0 every entry held in full."""
    out = {}
    for key, t in tensors.items():
        start, stop, rows = ranges.get(key, (0, 0, 0))
        if t.dim() and stop > start and t.shape[0] == stop - start:  # an expert shard (rows start..stop-1)
            if mesh.dp_rank == 0:
                out[key] = (t, start, stop, [rows, *t.shape[1:]])
        elif mesh.rank == 0:
            out[key] = (t, 0, t.shape[0] if t.dim() else 0, list(t.shape))
    return out


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Optimizer state by parameter name: ({"<param>/<state key>": tensor}, {param: {key: non-tensor}},
    param groups with names instead of indices)."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        if id(p) not in names:
            raise ValueError("the optimizer holds a parameter that is not in the model")
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        name = names[id(params[index])]
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v
            else:
                scalars.setdefault(name, {})[k] = v
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(params[i])] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, scalars, groups


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> Path:
    """Save `model` (and `optimizer`) from every rank (collective) into folder `path`.
    `extra`: JSON-serialisable data (step, config, ...), kept in the index. Returns `path`."""
    path = Path(path)
    mesh = mesh_of(model)
    ranges = _shard_ranges(model)
    if mesh.rank == 0:
        (path / MARKER).unlink(missing_ok=True)  # an overwritten checkpoint is incomplete until the end
    _barrier(mesh)
    listing = {}
    parts = [("model", {k: v.detach() for k, v in model.state_dict().items()}, ranges)]
    scalars, groups = {}, None
    if optimizer is not None:
        tensors, scalars, groups = _optimizer_tensors(model, optimizer)
        parts.append(("optim", tensors, {k: ranges[k.rsplit("/", 1)[0]] for k in tensors
                                          if k.rsplit("/", 1)[0] in ranges}))
    for kind, tensors, kind_ranges in parts:
        owned = _owned(tensors, kind_ranges, mesh)
        if not owned:
            continue
        file = f"{kind}-rank{mesh.rank:05d}.safetensors"
        data = {k: t.contiguous().cpu() for k, (t, *_) in owned.items()}
        atomic_write(path / file, lambda tmp, data=data: save_file(data, tmp))
        for k, (t, start, stop, shape) in owned.items():
            listing[f"{kind}:{k}"] = {"file": file, "start": start, "stop": stop, "shape": shape,
                                      "dtype": str(t.dtype).removeprefix("torch.")}
    listings = [listing]
    if mesh.world_size > 1:
        listings = [None] * mesh.world_size
        dist.all_gather_object(listings, listing)
    if mesh.rank == 0:
        index = {"format": FORMAT, "saved_world_size": mesh.world_size, "saved_ep_size": mesh.ep_size,
                 "model": {}, "optim": {}, "optim_scalars": scalars, "param_groups": groups, "extra": extra or {}}
        for entries in listings:
            for key, e in entries.items():
                kind, name = key.split(":", 1)
                t = index[kind].setdefault(name, {"shape": e["shape"], "dtype": e["dtype"], "shards": []})
                t["shards"].append({"file": e["file"], "start": e["start"], "stop": e["stop"]})
        for kind in ("model", "optim"):
            for t in index[kind].values():
                t["shards"].sort(key=lambda s: s["start"])
        atomic_write_json(path / INDEX, index)
    _barrier(mesh)  # every shard and the index are on disk
    if mesh.rank == 0:
        atomic_write_text(path / MARKER, FORMAT + "\n")
    _barrier(mesh)
    return path


def _barrier(mesh: Mesh) -> None:
    if mesh.world_size > 1:
        dist.barrier()


def read_index(path: str | os.PathLike) -> dict:
    """The index of the complete checkpoint folder `path` (ValueError if incomplete or foreign)."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {MARKER} marker: unfinished or interrupted save)")
    index = json.loads((path / INDEX).read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{path / INDEX}: format must be {FORMAT!r}, got {index.get('format')!r}")
    return index


def _read_rows(path: Path, key: str, entry: dict, start: int, stop: int, handles: dict) -> torch.Tensor:
    """Rows start..stop-1 (dim 0) of tensor `key` of the checkpoint, read from the shards
    holding them (only those rows are read)."""
    if not entry["shape"]:  # a 0-dim tensor
        s = entry["shards"][0]
        return _handle(path, s["file"], handles).get_tensor(key)
    pieces = []
    for s in entry["shards"]:
        lo, hi = max(start, s["start"]), min(stop, s["stop"])
        if lo < hi:
            pieces.append(_handle(path, s["file"], handles).get_slice(key)[lo - s["start"]:hi - s["start"]])
    out = torch.cat(pieces) if len(pieces) > 1 else pieces[0] if pieces else None
    if out is None or out.shape[0] != stop - start:
        raise ValueError(f"checkpoint {path}: the shards of {key} do not cover rows {start}..{stop - 1}")
    return out


def _handle(path: Path, file: str, handles: dict):
    if file not in handles:
        handles[file] = safe_open(str(path / file), framework="pt")
    return handles[file]


def _load_tensors(path: Path, index: dict, kind: str, targets: dict[str, torch.Tensor], ranges: dict,
                  handles: dict, prefix: str = "") -> None:
    """Copy every target tensor (local shard or full) from the checkpoint, checking shapes."""
    stored = index[kind]
    missing = [k for k in targets if prefix + k not in stored]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {kind} tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, t in targets.items():
        entry = stored[prefix + key]
        start, stop, rows = ranges.get(key, (0, t.shape[0] if t.dim() else 0, t.shape[0] if t.dim() else 0))
        full = [rows, *t.shape[1:]] if t.dim() else []
        if entry["shape"] != full:
            raise ValueError(f"checkpoint {path}: {key} has shape {entry['shape']}, the model expects {full}")
        with torch.no_grad():
            t.copy_(_read_rows(path, prefix + key, entry, start, stop, handles))


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a `save_checkpoint` folder into `model` (parallelised at any ep_size, or not) and
    `optimizer` (built over `model`'s parameters, same groups). Each rank reads only its own
    shards; no communication. Materialise a meta model first (`model.to_empty(device=...)`).
    Every model tensor must be in the checkpoint and every checkpoint tensor in the model, with
    matching (global) shapes. Returns the saved `extra` dict."""
    path = Path(path)
    index = read_index(path)
    ranges = _shard_ranges(model)
    state = model.state_dict(keep_vars=True)
    meta = [k for k, t in state.items() if t.is_meta]
    if meta:
        raise ValueError(f"model tensors {meta[:3]} are on the meta device: call model.to_empty(device=...) first")
    unexpected = sorted(set(index["model"]) - set(state))
    if unexpected:
        raise ValueError(f"checkpoint {path} has tensors the model lacks: {unexpected[:5]}")
    handles: dict = {}
    _load_tensors(path, index, "model", state, ranges, handles)
    if optimizer is not None:
        _load_optimizer(path, index, model, optimizer, ranges, handles)
    return index["extra"]


def _load_optimizer(path, index, model, optimizer, ranges, handles) -> None:
    if index["param_groups"] is None:
        raise ValueError(f"checkpoint {path} holds no optimizer state")
    names = {id(p): n for n, p in model.named_parameters()}
    params = {n: p for n, p in model.named_parameters()}
    groups = optimizer.param_groups
    saved = index["param_groups"]
    if len(saved) != len(groups) or any([names[id(p)] for p in g["params"]] != s["params"]
                                        for g, s in zip(groups, saved)):
        raise ValueError(f"checkpoint {path}: the optimizer's parameter groups differ from the saved ones")
    order = [names[id(p)] for g in groups for p in g["params"]]
    by_param: dict[str, dict] = {}
    for key in index["optim"]:
        name, k = key.rsplit("/", 1)
        by_param.setdefault(name, {})[k] = key
    state = {}
    for i, name in enumerate(order):
        if name not in by_param and name not in index["optim_scalars"]:
            continue
        p, entry = params[name], {}
        for k, key in by_param.get(name, {}).items():
            shape = index["optim"][key]["shape"]
            sharded = name in ranges and shape[:1] == [ranges[name][2]]
            local = list(p.shape) if sharded else shape
            t = torch.empty(local, dtype=getattr(torch, index["optim"][key]["dtype"]), device=p.device)
            _load_tensors(path, index, "optim", {key: t}, {key: ranges[name]} if sharded else {}, handles)
            entry[k] = t
        entry.update(index["optim_scalars"].get(name, {}))
        state[i] = entry
    param_groups = [{**s, "params": [order.index(n) for n in s["params"]]} for s in saved]
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
