"""Expert parallelism: the experts of one MoE layer sharded over the ranks of an ep group
(docs/design.md §6).

Every MoE layer calls `self.experts(x)` with x (E, M, D): for each of the E experts, the M
items (slots, or capacity-buffer rows) this rank built from its own sequences. The wrapper
keeps that contract while holding only experts [ep_rank*El, (ep_rank+1)*El), El = E / ep:

    x      (E, M, D)  = (ep, El, M, D)    block j: this rank's items for rank j's experts
    a2a -> (ep, El, M, D)                 block r: rank r's items for my El experts
    xs     (El, ep*M, D)                  my experts' items from every rank
    ys     (El, ep*M, D)  = local experts(xs)
    a2a <- (ep, El, M, D) = (E, M, D)     back to the ranks that own the items

Both exchanges are one `all_to_all_single` with equal static splits (every rank sends
El*M*D numbers to every other): no token counts, no host sync. The exchange is autograd-aware
(its backward is the reverse all-to-all), so expert weights get the gradient terms of every
rank's loss and each rank's input gradient the terms through every expert.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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


def shard_experts(experts: nn.Module, lo: int, hi: int) -> nn.Module:
    """A module of `experts`' type holding experts lo .. hi-1: parameters are slices (copies)
    along dim 0, settings (plain attributes: fused, impl, buffer pool, ...) are shared. A meta
    `experts` gives a meta shard (nothing is allocated)."""
    with torch.device("meta"):  # construct cheaply; the parameters are replaced below
        local = type(experts)(num_experts=hi - lo, dim=experts.dim, hidden_dim=experts.hidden_dim)
    for key, value in vars(experts).items():
        if not key.startswith("_") and key not in ("num_experts", "training") and not isinstance(
                value, (nn.Module, torch.Tensor)):
            setattr(local, key, value)
    for name, child in experts.named_children():  # the activation and dropouts: shared modules
        local._modules[name] = child
    for name, p in experts.named_parameters(recurse=False):
        local._parameters[name] = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
    local.train(experts.training)
    return local


class ExpertParallel(nn.Module):
    """Drop-in for a layer's `experts` (x: (E, M, D) -> (E, M, D)) holding E / ep of them.

    Its parameters have the wrapped module's names (w1, b1, w2, b2 for `Experts`), sharded along
    dim 0, so the model's state_dict keys do not change. `load_state_dict` accepts either this
    rank's shard or the full (E, ...) tensors (it keeps its slice). All ranks of the ep group
    must call forward with the same M (same local batch), as with any collective.
    """

    def __init__(self, experts: nn.Module, ep_rank: int, ep_size: int, group=None) -> None:
        super().__init__()
        E = experts.num_experts
        if E % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide num_experts={E} of {type(experts).__name__}")
        self.num_experts = E
        self.num_local_experts = E // ep_size
        self.ep_rank, self.ep_size, self.group = ep_rank, ep_size, group
        self.expert_offset = ep_rank * self.num_local_experts
        local = shard_experts(experts, self.expert_offset, self.expert_offset + self.num_local_experts)
        # One parameter dict for both: `local` computes with exactly the tensors this module
        # registers (and `to()`, `to_empty()`, `load_state_dict(assign=True)` replace). It is kept
        # outside `_modules` so that its parameters appear once, under the original names.
        self._parameters = local._parameters
        object.__setattr__(self, "local", local)

    @property
    def buffer_pool(self):
        """The local experts' buffer pool (found by `softmoe.release_buffers`)."""
        return getattr(self.local, "buffer_pool", None)

    def train(self, mode: bool = True):
        self.local.train(mode)
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, M, D = x.shape
        if E != self.num_experts:
            raise ValueError(f"expected input (num_experts={self.num_experts}, M, D), got {tuple(x.shape)}")
        ep, El = self.ep_size, self.num_local_experts
        recv = all_to_all(x.contiguous(), self.group)  # (E, M, D) = (ep, El, M, D), block r from rank r
        xs = recv.view(ep, El, M, D).transpose(0, 1).reshape(El, ep * M, D)  # (El, ep*M, D)
        ys = self.local(xs)  # (El, ep*M, D)
        back = ys.view(El, ep, M, D).transpose(0, 1).contiguous().view(E, M, D)  # (ep, El, M, D)
        return all_to_all(back, self.group)  # (E, M, D): my items, through every expert

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        for name, p in self._parameters.items():
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() and t.shape[0] == self.num_experts and p.shape[0] != self.num_experts:
                state_dict[prefix + name] = t[lo:hi]  # a full tensor: keep this rank's experts
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local experts {self.expert_offset}.."
                f"{self.expert_offset + self.num_local_experts - 1} (ep_rank {self.ep_rank} of {self.ep_size}), "
                f"local={type(self.local).__name__}")
