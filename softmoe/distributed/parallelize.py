"""Apply expert parallelism + data parallelism to a normally built model, from outside.

    mesh = init_mesh(ep_size=2)              # after init_process_group()
    model = parallelize(model, mesh)         # experts sharded, the rest replicated
    loss(model(shard_batch(x, mesh))).backward()   # loss = mean over the LOCAL batch
    sync_gradients(model)                    # = one process on the global batch
    optimizer.step()

Gradients (docs/design.md §6). With W ranks each holding b = B/W sequences and the loss of
each rank the mean over its own b, the global loss is L = (1/W) sum_r L_r. Then
  - a replicated parameter's gradient is (1/W) sum over all W ranks of the local gradients;
  - an expert shard's local gradient already holds the terms of all ep ranks' losses (the
    all-to-all backward brought them), so its gradient is (1/W) sum over the dp replicas of
    that shard: divide by W, not by dp (dividing by dp is the usual silent ep-fold error).
Both are one bucketed all-reduce (SUM) and a division by W, done by `sync_gradients`.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..layers import MoELayer
from .expert_parallel import is_sharded, local, shard_experts
from .mesh import Mesh, init_mesh

BUCKET_BYTES = 25 << 20  # the DDP default bucket size


def parallelize(model: nn.Module, mesh: Mesh | None = None, *, ep_size: int | None = None) -> nn.Module:
    """Shard every MoE layer's experts over `mesh`'s ep group (in place; returns `model`).

    Give `mesh` (from `init_mesh`) or `ep_size` (a mesh is made). ep_size 1 changes no module
    (plain data parallelism, dense models too). The mesh is kept as `model.parallel_mesh` for
    `sync_gradients` and the checkpoint functions. Works on a model built on the meta device:
    only the local expert shards are created (still meta; `model.to_empty(device=...)` then
    `load_checkpoint`). Replicated parameters must start equal on every rank (same seed, a
    loaded checkpoint, or `broadcast_parameters`)."""
    if mesh is None:
        mesh = init_mesh(1 if ep_size is None else ep_size)
    elif ep_size is not None and ep_size != mesh.ep_size:
        raise ValueError(f"ep_size={ep_size} contradicts mesh.ep_size={mesh.ep_size}; give one of them")
    if isinstance(getattr(model, "parallel_mesh", None), Mesh):
        raise ValueError("model is already parallelised (it has a parallel_mesh)")
    if mesh.ep_size > 1:
        layers = [layer for layer in model.modules() if isinstance(layer, MoELayer)]
        for layer in layers:  # check every layer before changing any
            E = layer.experts.num_experts
            if E % mesh.ep_size:
                raise ValueError(f"ep_size={mesh.ep_size} must divide num_experts={E} of every MoE layer")
        for layer in layers:
            shard_experts(layer.experts, mesh.device_mesh["ep"])  # in place: DTensors, hooks
    model.parallel_mesh = mesh
    return model


def mesh_of(model: nn.Module) -> Mesh:
    """The mesh `parallelize` gave `model`, or the single-process mesh."""
    mesh = getattr(model, "parallel_mesh", None)
    return mesh if isinstance(mesh, Mesh) else Mesh.single()


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert-parallel parameter in `model` (DTensors, "ep" shards
    along dim 0; `local(p)` is this rank's tensor)."""
    for prefix, module in model.named_modules():
        if is_sharded(module):
            for name, p in module.named_parameters(recurse=False):
                yield f"{prefix}.{name}", p


def replicated_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that all ranks hold in full."""
    sharded = {id(p) for _, p in expert_parameters(model)}
    return ((n, p) for n, p in model.named_parameters() if id(p) not in sharded)


def sync_gradients(model: nn.Module, replicated: bool = True, experts: bool = True) -> None:
    """Make every gradient that of one process on the global batch (see the module docstring):
    all-reduce (SUM) replicated gradients over the world and expert-shard gradients over the dp
    group, in buckets, then divide all by the world size. A missing gradient counts as zero.

    `replicated=False` when DDP (or FSDP) already averages the replicated parameters: build it
    with `ignored_params(model)` and call `sync_gradients(model, replicated=False)`."""
    mesh = mesh_of(model)
    if mesh.world_size == 1:
        return
    if replicated:
        _all_reduce_mean([p for _, p in replicated_parameters(model)], None, mesh.world_size)
    if experts and mesh.ep_size > 1:
        group = mesh.dp_group if mesh.dp_size > 1 else False
        _all_reduce_mean([p for _, p in expert_parameters(model)], group, mesh.world_size)


def ignored_params(model: nn.Module) -> set[str]:
    """Names to give `DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`
    so that DDP averages the replicated parameters only (expert shards differ per rank)."""
    return {name for name, _ in expert_parameters(model)}


def _all_reduce_mean(params: Iterable[nn.Parameter], group, world: int) -> None:
    """grad <- (sum of grad over `group`) / world, in buckets of BUCKET_BYTES per dtype.
    `group` False: no communication (a group of one rank), only the division."""
    grads = []
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(local(p.grad))
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        if group is not False:
            dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same-dtype tensors of at most BUCKET_BYTES (or one larger tensor)."""
    bucket, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > BUCKET_BYTES or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def broadcast_parameters(model: nn.Module) -> None:
    """Copy rank 0's replicated parameters and buffers to every rank, and each expert shard from
    its dp_rank-0 replica to the other replicas: afterwards all ranks start from one model."""
    mesh = mesh_of(model)
    if mesh.world_size == 1:
        return
    sharded = {id(p) for _, p in expert_parameters(model)}
    for t in [p for p in model.parameters() if id(p) not in sharded] + list(model.buffers()):
        dist.broadcast(local(t.data), src=0)
    if mesh.ep_size > 1 and mesh.dp_size > 1:
        src = mesh.ep_rank  # global rank of dp_rank 0 in this rank's dp group
        for _, p in expert_parameters(model):
            dist.broadcast(local(p.data), src=src, group=mesh.dp_group)
