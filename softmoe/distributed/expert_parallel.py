"""Expert parallelism: the experts of one MoE layer sharded in place over the "ep" dimension of
a DeviceMesh, as DTensors (docs/design.md §6, docs/distributed.md).

Every MoE layer calls `self.experts(x)` with x (E, M, D): for each of the E experts, the M
items (slots, or capacity-buffer rows) this rank built from its own sequences. `shard_experts`
keeps that contract on the layer's own experts module (its type and place in the model do not
change: `model.modules()` sees it, any `Experts` subclass shards, buffer switches reach it):
each parameter becomes a DTensor `Shard(0)` over "ep" (local experts [ep_rank*El, (ep_rank+1)*El),
El = E / ep) and `torch.distributed.tensor.distribute_module` hooks the exchange around forward:

    x      (E, M, D)  = (ep, El, M, D)    block j: this rank's items for rank j's experts
    a2a -> (ep, El, M, D)                 block r: rank r's items for my El experts
    xs     (El, ep*M, D)                  my experts' items from every rank       (input hook)
    ys     (El, ep*M, D)  = forward(xs)   on the local tensors (`to_local()` of every parameter)
    a2a <- (ep, El, M, D) = (E, M, D)     back to the ranks that own the items    (output hook)

Both exchanges are one `all_to_all_single` with equal static splits (every rank sends
El*M*D numbers to every other): no token counts, no host sync. The exchange is autograd-aware
(its backward is the reverse all-to-all), so expert weights get the gradient terms of every
rank's loss and each rank's input gradient the terms through every expert.

Inside forward the module computes on plain local tensors: the input hook puts each DTensor
parameter's `to_local()` (differentiable: its gradient lands on the DTensor as a DTensor) in
the module's parameter slots and the output hook puts the DTensors back, so `Experts.forward`
(fused path included) needs no change. FSDP2 (fsdp.py) composes: its pre-forward hook runs
first and gathers the "dp" shards into the DTensor the input hook then makes local.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Equal-split all-to-all along dim 0 of `x` over `group` (None: the world), autograd-aware:
    the backward is the same exchange applied to the gradient (equal splits are their own
    reverse). A failure in either direction raises a RuntimeError that says which rank and why."""
    return _AllToAll.apply(x, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group, "forward")

    @staticmethod
    def backward(ctx, g):
        return _exchange(g, ctx.group, "backward"), None


def _exchange(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    try:
        dist.all_to_all_single(out, x, group=group)
    except (RuntimeError, dist.DistError) as e:  # a peer died or timed out: say so, not just "Connection closed"
        raise RuntimeError(f"expert-parallel all_to_all ({direction}) failed on rank {dist.get_rank()}: another "
                           f"rank of the ep group raised, exited or stopped calling collectives (timeout). "
                           f"Cause: {e}") from e
    return out


EP_ATTR = "_softmoe_ep_mesh"  # set on a sharded experts module: the "ep" DeviceMesh it is sharded over


def is_sharded(module: nn.Module) -> bool:
    """Whether `shard_experts` sharded `module`."""
    return getattr(module, EP_ATTR, None) is not None


def shard_experts(experts: nn.Module, ep_mesh) -> nn.Module:
    """Shard `experts` (x: (E, M, D) -> (E, M, D), parameters (E, ...) along dim 0, attribute
    `num_experts` = E) in place over the 1-D DeviceMesh `ep_mesh` (`mesh.device_mesh["ep"]`).
    Works on the meta device (the local shards stay meta, nothing is allocated or sent) and on
    materialised parameters (each rank keeps its rows: every rank must hold the same full
    tensors). All ranks of the ep group must call forward with the same M. Returns `experts`."""
    if is_sharded(experts):
        raise ValueError(f"{type(experts).__name__} is already expert-parallel")
    E, ep = getattr(experts, "num_experts", None), ep_mesh.size()
    if not isinstance(E, int) or E % ep:
        raise ValueError(f"ep_size={ep} must divide num_experts={E} of {type(experts).__name__}")
    params = dict(experts.named_parameters(recurse=False))
    bad = [n for n, p in params.items() if p.dim() == 0 or p.shape[0] != E]
    if bad or not params:
        raise ValueError(f"{type(experts).__name__}: every parameter must have num_experts={E} as dim 0 "
                         f"(got {[(n, tuple(params[n].shape)) for n in bad] or 'no parameters'})")
    nested = [n for n, _ in experts.named_parameters() if "." in n]
    if nested:
        raise ValueError(f"{type(experts).__name__}: parameters of child modules ({nested[:3]}) cannot be "
                         f"sharded over experts; keep every expert parameter on the experts module itself")
    El = E // ep
    lo = ep_mesh.get_local_rank() * El

    def partition(name, module, mesh):
        if module is not experts:
            return
        for n, p in params.items():
            local = p.detach()[lo:lo + El].clone()
            dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=p.shape, stride=p.stride())
            module.register_parameter(n, nn.Parameter(dt, requires_grad=p.requires_grad))

    def dispatch(module, inputs, mesh):
        x = inputs[0]
        if x.dim() != 3 or x.shape[0] != E:
            raise ValueError(f"expected input (num_experts={E}, M, D), got {tuple(x.shape)}")
        _, M, D = x.shape
        recv = all_to_all(x, mesh.get_group())  # (E, M, D) = (ep, El, M, D), block r from rank r
        xs = recv.view(ep, El, M, D).transpose(0, 1).reshape(El, ep * M, D)  # (El, ep*M, D)
        _enter_local(module)
        return (xs, *inputs[1:])

    def combine(module, ys, mesh):
        _leave_local(module)
        El_, epM, D = ys.shape  # (El, ep*M, D)
        back = ys.view(El_, ep, epM // ep, D).transpose(0, 1).reshape(E, epM // ep, D)  # (ep, El, M, D)
        return all_to_all(back, mesh.get_group())  # (E, M, D): my items, through every expert

    distribute_module(experts, ep_mesh, partition_fn=partition, input_fn=dispatch, output_fn=combine)
    # a forward that raises skips `combine`: put the DTensors back all the same
    experts.register_forward_hook(lambda module, inputs, output: _leave_local(module), always_call=True)
    object.__setattr__(experts, EP_ATTR, ep_mesh)
    return experts


def _enter_local(module: nn.Module) -> None:
    """Put `to_local()` of each DTensor parameter in its slot (remembering both)."""
    swapped = {}
    for name, p in module._parameters.items():
        if isinstance(p, DTensor):
            local = p.to_local()
            swapped[name] = (p, local)
            module._parameters[name] = local
    module.__dict__["_softmoe_ep_swapped"] = swapped


def _leave_local(module: nn.Module) -> None:
    """Put the DTensor parameters back (where the slot still holds the local tensor we put there)."""
    for name, (p, local) in module.__dict__.pop("_softmoe_ep_swapped", {}).items():
        if module._parameters.get(name) is local:
            module._parameters[name] = p


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's tensor of `t`: `t.to_local()` for a DTensor (an alias: writes land in `t`),
    else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_region(t: torch.Tensor) -> tuple[slice, ...]:
    """The global index block this rank's tensor of `t` holds: every index for a plain tensor,
    the local shard's block for a DTensor ("ep" rows, FSDP's "dp" chunk, or both), so that
    `local(t)` equals `full[local_region(t)]` of the unsharded tensor."""
    if not isinstance(t, DTensor):
        return tuple(slice(0, n) for n in t.shape)
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


def expert_offset(module: nn.Module) -> tuple[int, int, int]:
    """(first global expert, local expert count, global expert count) of a sharded experts
    module on this rank (its "ep" shard: FSDP's "dp" sharding, on dim 1, does not change it)."""
    mesh = getattr(module, EP_ATTR)
    E = module.num_experts
    El = E // mesh.size()
    return mesh.get_local_rank() * El, El, E
