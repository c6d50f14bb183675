"""Expert parallelism: step and communication time per MoE layer at 1, 2, 4 processes, against the all-gather design.

Launches `--procs` local processes (gloo on CPU, NCCL on GPUs, one thread each on CPU so they
do not oversubscribe) for each process count, builds one Soft MoE layer at the given shape,
and times a forward + backward step with

  a2a:    `softmoe.distributed.ExpertParallel` (two equal-split all-to-alls each way);
  gather: the popular port's design (`AllGatherExperts`): all-gather every rank's slots, run
          the local experts on all of them, all-gather the outputs (its backward, as in the
          port, keeps only this rank's share and is therefore wrong; timed as it is).

Communication time is the same step's time spent in the collectives (measured by timing each
collective call). Bytes moved per rank and step are computed analytically (docs/distributed.md)
and checked against the tensors the collectives actually received.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from softmoe.distributed.expert_parallel import shard_experts


class _PortAllGather(torch.autograd.Function):
    """All-gather along `dim` over `group`; backward returns only this rank's chunk of the
    incoming gradient, with no sum over ranks: the gradient terms of the other ranks' losses
    are dropped (the port's bug, kept here to show that the tests catch it)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.size, ctx.dim)[ctx.rank].contiguous(), None, None


class AllGatherExperts(nn.Module):
    """The popular port's expert parallelism, for comparison only (wrong backward).

    forward(x: (E, M, D)) -> (E, M, D): all-gather x along M from the ep ranks -> (E, ep*M, D);
    run this rank's El experts on every rank's items -> (El, ep*M, D); all-gather along E
    -> (E, ep*M, D); keep this rank's M items."""

    def __init__(self, experts: nn.Module, ep_rank: int, ep_size: int, group=None) -> None:
        super().__init__()
        El = experts.num_experts // ep_size
        self.lo, self.hi, self.ep_rank, self.group = ep_rank * El, (ep_rank + 1) * El, ep_rank, group
        self.local = shard_experts(experts, self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, M, D = x.shape
        xg = _PortAllGather.apply(x, 1, self.group)  # (E, ep*M, D)
        ys = self.local(xg[self.lo:self.hi])  # (El, ep*M, D)
        yg = _PortAllGather.apply(ys, 0, self.group)  # (E, ep*M, D)
        return yg[:, self.ep_rank * M:(self.ep_rank + 1) * M].contiguous()
