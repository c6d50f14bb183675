"""Process groups for expert parallelism x data parallelism (docs/design.md §6,
docs/distributed.md "What is sharded where").

The world of W ranks is a (dp, ep) grid, W = dp * ep, with the ep ranks of one expert group
contiguous: rank r has ep_rank = r % ep and dp_rank = r // ep.

    ep group of rank r:  ranks dp_rank*ep .. dp_rank*ep + ep - 1  (together they hold all E experts)
    dp group of rank r:  ranks ep_rank, ep_rank + ep, ...          (replicas of the same expert shard)

The grid is a `torch.distributed.device_mesh.DeviceMesh` of shape (dp, ep) with dimension names
("dp", "ep") (`Mesh.device_mesh`): experts are DTensors sharded over "ep" (expert_parallel.py),
FSDP2 shards them over "dp" and everything else over the flattened ("dp", "ep") mesh
(`Mesh.dense_mesh`, fsdp.py).

HSDP (`dp_replicate` R > 1, for several nodes): dp = R x S is split into R replicas of
S = dp / R sharding ranks, rank r = (rep*S + s)*ep + e (ep contiguous, then dp_shard, then
dp_replicate; dp_rank = rep*S + s as before). The DeviceMesh is then 3-D (R, S, ep) named
("dp_replicate", "dp_shard", "ep"), with "dp" = ("dp_replicate", "dp_shard") flattened (so
`device_mesh["dp"]` and `Mesh.dp_group` are still all dp replicas of an expert shard) and
"dp_shard_ep" = ("dp_shard", "ep") flattened. FSDP2 gets 2-D meshes, (replicate, shard):

    Mesh.dense_mesh    (R, S*ep)  ("dp_replicate", "dp_shard_ep")  blocks and root
    Mesh.expert_mesh   (R, S)     ("dp_replicate", "dp_shard")     experts (1-D "dp" when R = 1)

so a parameter is sharded over the S*ep (experts: S) ranks of one replica (one node, say) and
replicated over the R replicas. R = 1 is exactly the (dp, ep) mesh above (1-D FSDP meshes).
Every process group is created with a timeout, so a rank that dies or stops calling collectives
makes the others fail with an error after at most that long instead of hanging.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..layers.common import check_positive_int

DEFAULT_TIMEOUT_S = 300.0


def default_backend() -> str:
    """"nccl" when CUDA is available, else "gloo" (CPU)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                       init_method: str | None = None, rank: int | None = None,
                       world_size: int | None = None) -> None:
    """`torch.distributed.init_process_group` with a timeout (seconds) on every collective.

    Under `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) call it
    with no arguments. Otherwise give `init_method` ("tcp://host:port" or "file:///path"),
    `rank` and `world_size`. With NCCL each process uses the GPU `LOCAL_RANK`."""
    if dist.is_initialized():
        raise ValueError("torch.distributed is already initialised; call init_process_group once per process")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    backend = backend or default_backend()
    if init_method is None and "MASTER_ADDR" not in os.environ:
        raise ValueError("init_method is None and MASTER_ADDR is not set: launch with torchrun, or pass "
                         "init_method='tcp://host:port' (or 'file:///shared/path') with rank and world_size")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {} if rank is None else {"rank": rank, "world_size": world_size}
    dist.init_process_group(backend, init_method=init_method,
                            timeout=datetime.timedelta(seconds=float(timeout_s)), **kwargs)


@dataclasses.dataclass(frozen=True)
class Mesh:
    """This rank's place in the (dp, ep) grid (dp = dp_replicate x dp_shard) and the process
    groups it belongs to.

    `ep_group` / `dp_group` are None when they are the whole world (`dist.group.WORLD`) or a
    single rank (no communication needed); `ep_size == 1` is plain data parallelism.
    `dp_group` holds all dp = dp_replicate x dp_shard replicas of this rank's expert shard."""
    world_size: int
    rank: int
    ep_size: int
    ep_group: object = None
    dp_group: object = None
    device: torch.device = torch.device("cpu")
    device_mesh: object = None  # DeviceMesh (dp, ep), or (dp_replicate, dp_shard, ep); None for a single process
    # FSDP2's mesh of the dense parameters: 1-D "dp_shard" = (dp, ep) flattened, all W ranks;
    # HSDP: 2-D (dp_replicate, dp_shard_ep), sharded over dp_shard x ep, replicated over dp_replicate
    dense_mesh: object = None
    io_group: object = None  # all W ranks (gloo) with the checkpoint I/O timeout, or None: the default group
    dp_replicate: int = 1  # HSDP replicas (R); 1: every dp rank shards (plain FSDP)
    # FSDP2's mesh of the experts: 1-D "dp"; HSDP: 2-D (dp_replicate, dp_shard)
    expert_mesh: object = None

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def dp_shard(self) -> int:
        """S: the dp ranks of one replica, over which FSDP2 shards (dp_size / dp_replicate)."""
        return self.dp_size // self.dp_replicate

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @staticmethod
    def single() -> Mesh:
        """The mesh of an unparallelised, single-process run."""
        return Mesh(world_size=1, rank=0, ep_size=1)


def init_mesh(ep_size: int = 1, dp_replicate: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
              io_timeout_s: float | None = None) -> Mesh:
    """The (dp, ep) mesh over the initialised world, or with `dp_replicate` R > 1 the HSDP mesh
    (dp_replicate, dp_shard, ep) (module docstring). Collective: every rank calls it, in the
    same order relative to other group creations. `io_timeout_s`: also a gloo group of every
    rank whose collectives wait that long (`Mesh.io_group`, for the barriers and DCP's
    coordination around checkpoint I/O, which can outlast the training collectives' timeout)."""
    check_positive_int("ep_size", ep_size)
    check_positive_int("dp_replicate", dp_replicate)
    if io_timeout_s is not None and not (isinstance(io_timeout_s, (int, float)) and io_timeout_s > 0):
        raise ValueError(f"io_timeout_s must be a number of seconds > 0 or None, got {io_timeout_s!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("torch.distributed is not initialised: call softmoe.distributed.init_process_group() "
                         "(or launch with torchrun and call it) before init_mesh / parallelize")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (world = dp x ep)")
    dp_size = world // ep_size
    if dp_size % dp_replicate:
        raise ValueError(f"dp_replicate={dp_replicate} must divide dp = world / ep_size = {world} / {ep_size} = "
                         f"{dp_size} (dp = dp_replicate x dp_shard)")
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    backend = "nccl" if nccl else "gloo"

    def override(size: int):  # every sub-group gets the collective timeout (DeviceMesh's default is 30 min)
        if not 1 < size < world:
            return None  # one rank (no communication) or the world (the default group, its timeout)
        opts = dist.ProcessGroupNCCL.Options() if nccl else dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=float(timeout_s))
        return backend, opts

    if dp_replicate == 1:
        shape, names = (dp_size, ep_size), ("dp", "ep")
    else:
        shape, names = (dp_replicate, dp_size // dp_replicate, ep_size), ("dp_replicate", "dp_shard", "ep")
    overrides = {name: override(size) for name, size in zip(names, shape) if override(size) is not None}
    device_mesh = init_device_mesh(device.type, shape, mesh_dim_names=names, backend_override=overrides or None)
    if dp_replicate == 1:
        dense_mesh = device_mesh["dp", "ep"]._flatten("dp_shard")
        expert_mesh = dp_mesh = device_mesh["dp"]
    else:  # "dp" stays addressable (device_mesh["dp"]): every dp replica of an expert shard
        expert_mesh = device_mesh["dp_replicate", "dp_shard"]
        dp_mesh = expert_mesh._flatten("dp", backend_override=override(dp_size))
        S = dp_size // dp_replicate
        shard_ep = device_mesh["dp_shard", "ep"]._flatten("dp_shard_ep", backend_override=override(S * ep_size))
        dense_mesh = DeviceMesh._concatenate([device_mesh["dp_replicate"], shard_ep])
    ep_group = device_mesh["ep"].get_group() if 1 < ep_size < world else None
    dp_group = dp_mesh.get_group() if 1 < dp_size < world else None
    io_group = None if io_timeout_s is None else dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=float(io_timeout_s)))
    return Mesh(world_size=world, rank=rank, ep_size=ep_size, ep_group=ep_group, dp_group=dp_group, device=device,
                device_mesh=device_mesh, dense_mesh=dense_mesh, io_group=io_group, dp_replicate=dp_replicate,
                expert_mesh=expert_mesh)


def shard_batch(batch: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's equal share (dim 0) of a global batch: rows rank*b .. (rank+1)*b - 1, with
    b = global batch / world size. Every rank must hold the same number of sequences (the
    all-to-alls use equal, static splits)."""
    B = batch.shape[0]
    if B % mesh.world_size:
        raise ValueError(f"the global batch size ({B}) must be divisible by the world size "
                         f"({mesh.world_size} = dp {mesh.dp_size} x ep {mesh.ep_size})")
    b = B // mesh.world_size
    return batch[mesh.rank * b:(mesh.rank + 1) * b]
