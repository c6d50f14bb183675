"""`softmoe train` under torchrun: expert x data parallelism for the trainer (docs/distributed.md,
docs/design.md §6). The trainer calls these few hooks; a run without torchrun never reaches them.

    setup_parallel   the launch checks, the process group and the (dp, ep) mesh, or None
    rows             this rank's rows of the global batch the single-process run would draw
    finish_step      gradients averaged over the global batch, the logged loss/accuracy made global
    clip_grad_norm   the global gradient norm (expert shards summed over the ep group), then clip
    save_sharded     a checkpoint directory every layout (and `softmoe eval`) can load

Checkpoint of a parallel run (checkpoints/step_N/, renamed into place by rank 0 when complete):
    sharded/         the library's per-rank shards + index.json + COMPLETE (model and optimizer)
    config.json + model.safetensors   the full model (rank 0 gathers it by reading the shards
                     into an unparallelised copy: small models only, and what eval/from_pretrained read)
    train_config.json, train_state.pt (step, RNG states, data position; no optimizer: it is sharded)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from softmoe import distributed as smd

SHARDED = "sharded"


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup_parallel(ep_size: int, batch_size: int, timeout_s: float):
    """The mesh of this torchrun rank, or None for a plain single-process run (ep_size 1, no
    WORLD_SIZE). ValueError for an inconsistent launch, before any process group exists."""
    if not launched():
        if ep_size != 1:
            raise ValueError(f"ep_size={ep_size} needs ep_size processes or a multiple: launch with "
                             f"torchrun --nproc-per-node N -m softmoe train ... (WORLD_SIZE is not set)")
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (torchrun's --nproc-per-node x nodes)")
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}: each rank takes "
                         f"batch_size / world of the same global batch")
    if world == 1:
        return None
    if not dist.is_initialized():
        smd.init_process_group(timeout_s=timeout_s)
    return smd.init_mesh(ep_size, timeout_s=timeout_s)


def has_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_process_group() -> None:
    """Destroy the default process group if one exists (its gloo/NCCL threads would otherwise
    abort the process at exit, turning a clean exit status into SIGABRT)."""
    if has_process_group():
        dist.destroy_process_group()


def all_ranks_agree(flag: bool) -> bool:
    """True when `flag` is True on every rank (a MIN all-reduce; every rank must call it)."""
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def rows(mesh, batch_size: int) -> tuple[int, int] | None:
    """This rank's rows (start, stop) of the global batch of `batch_size`, as `shard_batch` cuts
    it (rank*b .. (rank+1)*b - 1, b = batch_size / world); None for a single process."""
    if mesh is None:
        return None
    b = batch_size // mesh.world_size
    return mesh.rank * b, (mesh.rank + 1) * b


def num_params(model: nn.Module) -> int:
    """Parameters of the whole model (an expert shard counts ep_size times)."""
    ep = smd.mesh_of(model).ep_size
    expert = {id(p) for _, p in smd.expert_parameters(model)}
    return sum(p.numel() * (ep if id(p) in expert else 1) for p in model.parameters())


def clip_grad_norm(model: nn.Module, params: list, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over the whole (unsharded) model: the squared norms of the expert shards
    are summed over the ep group; replicated gradients are equal on every rank after the sync."""
    mesh = smd.mesh_of(model)
    expert = {id(p) for _, p in smd.expert_parameters(model)}
    grads_r = [p.grad for p in params if p.grad is not None and id(p) not in expert]
    grads_e = [p.grad for p in params if p.grad is not None and id(p) in expert]
    zero = torch.zeros((), dtype=torch.float32, device=params[0].device)
    sq_r = sum((g.float().pow(2).sum() for g in grads_r), zero)
    sq_e = sum((g.float().pow(2).sum() for g in grads_e), zero.clone())
    if mesh.ep_size > 1:
        dist.all_reduce(sq_e, group=mesh.ep_group)
    total = (sq_r + sq_e).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads_r + grads_e:
        g.mul_(coef)
    return total


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over every rank (a local-batch mean becomes the global-batch mean)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def save_sharded(final: Path, model: nn.Module, optimizer, train_state: dict, train_config: dict,
                 build_model, keep: int) -> Path:
    """Write the parallel checkpoint `final` (collective). Every rank writes its shards into a
    hidden temporary directory; rank 0 adds the full model, the config and the train state and
    renames it to `final` only when all of it is on disk."""
    from softmoe.models.hub import TRAIN_CONFIG, TRAIN_STATE, list_checkpoints, save_pretrained

    mesh = smd.mesh_of(model)
    root = final.parent
    tmp = root / f".tmp-{final.name}-parallel"
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    smd.save_checkpoint(tmp / SHARDED, model, optimizer, extra={"step": train_state["step"]})  # ends in a barrier
    if mesh.rank == 0:
        try:
            full = build_model()
            smd.load_checkpoint(tmp / SHARDED, full)
            save_pretrained(full, tmp)
            with open(tmp / TRAIN_CONFIG, "w", encoding="utf-8") as f:
                json.dump(train_config, f, indent=2, sort_keys=True)
                f.write("\n")
            with open(tmp / TRAIN_STATE, "wb") as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in list_checkpoints(root.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier()
    return final


def load_sharded_or_full(checkpoint: Path, model: nn.Module, optimizer, train_state: dict) -> None:
    """Weights and optimizer state of `checkpoint` into `model` at any layout: the sharded
    format of a parallel run, or the single-file one of a single-process run (whole tensors;
    each expert shard keeps its rows of the weights and of their optimizer state)."""
    from softmoe.models.hub import WEIGHTS_NAME, load_safetensors

    if (checkpoint / SHARDED).is_dir():
        smd.load_checkpoint(checkpoint / SHARDED, model, optimizer)
        return
    model.load_state_dict(load_safetensors(checkpoint / WEIGHTS_NAME), strict=True)  # shards slice full tensors
    optimizer.load_state_dict(_shard_optimizer_state(model, optimizer, train_state["optimizer"]))


def _shard_optimizer_state(model: nn.Module, optimizer, state: dict) -> dict:
    """A single-process optimizer state_dict with every expert parameter's state tensors
    (Adam's moments, (E, ...)) cut to this rank's experts; the rest unchanged. The optimizer
    was built from the parallelised model the same way, so parameter i is the same tensor."""
    rows = {}
    for module in model.modules():
        if isinstance(module, smd.ExpertParallel):
            lo = module.expert_offset
            for p in module._parameters.values():
                rows[id(p)] = (lo, lo + module.num_local_experts, module.num_experts)
    if not rows:
        return state
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        lo, hi, experts = rows.get(id(params[int(index)]), (None, None, None))
        out["state"][index] = {k: (v[lo:hi].clone() if lo is not None and torch.is_tensor(v) and v.dim()
                                   and v.shape[0] == experts else v) for k, v in entry.items()}
    return out


def finish_step(run, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, aux, max_norm: float, result):
    """After this rank's backward: average the gradients over the global batch, clip by the
    global norm, update; the returned `result` (trainer._StepResult) holds global-batch values."""
    smd.sync_gradients(run.model)
    if run.mesh.ep_size > 1:
        grad_norm = clip_grad_norm(run.model, run.params, max_norm)
    else:  # every gradient is whole and equal on every rank: the single-process clip
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    run.optimizer.step()
    correct = reduce_sum((logits.detach().argmax(-1) == y).sum())
    return result(reduce_mean(loss), grad_norm.detach(), correct, len(y) * run.mesh.world_size,
                  None if aux is None else reduce_mean(aux))


class NullWriter:
    """The metrics writer of ranks other than 0: they log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
