"""FSDP2 (`torch.distributed.fsdp.fully_shard`) as the data-parallel engine, on top of the
in-place DTensor expert parallelism (expert_parallel.py), in torchtitan's layout:

    experts of every MoE layer   fully_shard on `Mesh.expert_mesh` (mesh["dp"]), Shard(1): each
                                 "ep" shard (E/ep, ...) is cut along dim 1 over its dp replicas
                                 (any dp, even dp > E/ep)
    each transformer block       fully_shard on the dense mesh (dp x ep flattened: all W ranks)
    the root (embeddings, head)  fully_shard on the dense mesh
    0-dim parameters             (router `scale`: FSDP2 shards dim 0 and rejects them) left out
                                 of FSDP (`ignored_params`): replicated, plain tensors, averaged
                                 by `sync_ignored_gradients` after backward

HSDP (`init_mesh(..., dp_replicate=R)`, R > 1; docs/distributed.md "HSDP"): both meshes are
2-D (replicate, shard): experts (dp_replicate, dp_shard), the rest (dp_replicate, dp_shard x ep).
FSDP2 then shards over the shard dim, all-reduces the reduce-scattered gradient over the
replicate dim, and the DTensors carry placements (Replicate(), Shard(1), Shard(0)) for the
experts on (dp_replicate, dp_shard, ep) and (Replicate(), Shard(0)) for the rest.

Gradients (docs/distributed.md): each rank's loss is the mean over its own B/W sequences, so
the global gradient is the SUM over the W ranks' terms / W for every parameter. FSDP's
reduce-scatter sums over its shard group (then, under HSDP, its all-reduce over the replicate
group); its divide factor is set to W everywhere (dense: W ranks; an expert's dp replicas hold
dp ranks, the all-to-all backward already summed the ep ranks' terms). gloo has no PREMUL_SUM /
AVG, so a unit whose SHARD group has more than one rank is forced to SUM, then divides once
after the (reduce-scatter and) all-reduce. A unit whose shard group is one rank is not forced:
FSDP2 (torch 2.14 `foreach_reduce`) skips the reduce-scatter and divides by the factor while
copying, then all-reduces (HSDP) with SUM; forced, it would divide by W twice.

`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)` is the `mixed_precision`
option. Everything is applied from outside: the layers hold no distributed code.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from .expert_parallel import is_sharded, local
from .mesh import Mesh

FSDP_ATTR = "_softmoe_fsdp"  # set on the root: the fully_shard settings (ignored parameters)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The per-block FSDP units: `model.blocks` (a ViT's ModuleList) if it has them, else none."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else []


def apply_fsdp(model: nn.Module, mesh: Mesh, *, mixed_precision: bool = False,
               reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` (already `parallelize`d over `mesh`, on the meta device or materialised)
    with FSDP2 as the module docstring says; in place, returns `model`. Materialise afterwards
    (`smd.materialize`: `to_empty` allocates only the local shards)."""
    if mesh.device_mesh is None:
        raise ValueError("apply_fsdp needs a multi-process mesh (smd.init_mesh under torchrun), got a single process")
    if getattr(model, FSDP_ATTR, None) is not None:
        raise ValueError("model is already sharded with FSDP (apply_fsdp was called before)")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    ignored_names = sorted(n for n, p in model.named_parameters() if p.dim() == 0)
    ignored = {model.get_parameter(n) for n in ignored_names}
    common = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    experts = [m for m in model.modules() if is_sharded(m)]
    for m in experts:
        fully_shard(m, mesh=mesh.expert_mesh, shard_placement_fn=lambda p: Shard(1), **common)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh.dense_mesh, ignored_params=ignored & set(block.parameters()), **common)
    fully_shard(model, mesh=mesh.dense_mesh, ignored_params=ignored, **common)
    gloo = dist.get_backend() == "gloo"
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(mesh.world_size))
            shard_group_size = mesh.dp_shard if is_sharded(m) else mesh.dp_shard * mesh.ep_size
            if gloo and shard_group_size > 1:
                m.set_force_sum_reduction_for_comms(True)
    object.__setattr__(model, FSDP_ATTR, {"ignored": ignored_names, "mixed_precision": mixed_precision})
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether `apply_fsdp` sharded `model`."""
    return getattr(model, FSDP_ATTR, None) is not None


def sync_ignored_gradients(model: nn.Module) -> None:
    """The gradients of the parameters FSDP leaves out (0-dim ones): SUM over all ranks / W
    (one all-reduce). A missing gradient counts as zero. No-op without FSDP."""
    settings = getattr(model, FSDP_ATTR, None)
    if settings is None or not settings["ignored"]:
        return
    params = [p for p in map(model.get_parameter, settings["ignored"]) if p.requires_grad]  # by name: to_empty
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.stack([p.grad.reshape(()) for p in params])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for p, g in zip(params, flat):
        p.grad.copy_(g)


def _reduce_groups(t: DTensor) -> list:
    """The process groups over which `t`'s local shards must be summed: its Shard dims only (a
    Replicate dim, HSDP's dp_replicate, holds the same elements on each of its ranks: counted once)."""
    mesh = t.device_mesh
    return [mesh.get_group(i) for i, pl in enumerate(t.placements) if pl.is_shard() and mesh.size(i) > 1]


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole, unsharded model for any layout: every
    gradient is a plain tensor (equal on every rank after the gradient sync) or a DTensor
    (FSDP and/or "ep" shards, each element on one rank of its shard groups: the squared sums are
    summed over those groups, one all-reduce per distinct set of groups; HSDP's replicate dim
    is not summed over, its replicas hold equal gradients). Returns the total
    (float32) norm before clipping, equal on every rank. Only norm_type 2 is supported."""
    if norm_type != 2.0:
        raise ValueError(f"norm_type must be 2.0 (the only norm the sharded clip computes), got {norm_type!r}")
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = local(grads[0]).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    by_groups: dict[tuple, tuple[list, torch.Tensor]] = {}
    for g in grads:
        sq = local(g).float().pow(2).sum()
        if isinstance(g, DTensor):
            groups = _reduce_groups(g)
            key = tuple(id(x) for x in groups)
            if key:
                if key not in by_groups:
                    by_groups[key] = (groups, torch.zeros((), dtype=torch.float32, device=device))
                by_groups[key][1].add_(sq)
                continue
        total.add_(sq)
    for groups, sq in by_groups.values():
        for group in groups:
            dist.all_reduce(sq, group=group)
        total.add_(sq)
    total = total.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coef.to(local(g).dtype))
    return total
