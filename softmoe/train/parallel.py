"""`softmoe train` under torchrun: expert x data parallelism for the trainer (docs/distributed.md,
docs/design.md §6). The trainer calls these few hooks; a run without torchrun reaches only
setup_parallel, micro_batches and gradient_sync (a no-op for it).

    setup_parallel   the launch checks, the process group and the (dp, ep) mesh (HSDP: dp_replicate
                     x dp_shard x ep), or None
    parallelize      on the meta model: experts sharded over "ep" (DTensors), then FSDP2 or DDP
    rows             this rank's rows of the global batch the single-process run would draw
    micro_batches    how many micro-batches of micro_batch_size each rank's rows make (accumulation)
    gradient_sync    around a micro-batch: no gradient reduction but on the step's last micro-batch
    finish_step      gradients of the global batch, the EP-aware clip, the update; logged values global
    save_parallel    a DCP checkpoint directory every layout (and one process, `softmoe eval`) loads;
                     with checkpoint_async a PendingSave, finished by its wait()
    rng_to_restore   on resume: this rank's own RNG states (same world size) or rank 0's (another)

Checkpoint of a parallel run (checkpoints/step_N/, renamed into place by rank 0 when complete):
    dcp/             model and optimizer state as DCP shards, every rank writing its own
                     (softmoe.distributed.save_checkpoint); no whole-model file is written in the job
    config.json      the model's config (what `softmoe export` / `from_dcp` build the model from)
    train_config.json, train_state.pt (step, rank 0's RNG states, rng_ranks, data position; the
                     optimizer is in dcp/)
    rng/rank_<r>.pt  rank r's RNG states (rng_to_restore: rank r resumes with them at the same
                     world size; at another one every rank takes rank 0's)
With checkpoint_async the shards are written in the background (PendingSave): the directory is
renamed to step_N only when `wait()` finishes it, so a crash mid-save leaves the previous step_*.
"""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from softmoe import distributed as smd
from softmoe.models.hub import DCP_DIR

SHARDED = "sharded"


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup_parallel(ep_size: int, batch_size: int, timeout_s: float, io_timeout_s: float | None = None,
                   micro_batch_size: int = 0, dp_replicate: int = 1):
    """The mesh of this torchrun rank, or None for a plain single-process run (ep_size 1 and
    dp_replicate 1, no WORLD_SIZE). ValueError for an inconsistent launch, before any process
    group exists."""
    if not launched():
        for name, value in (("ep_size", ep_size), ("dp_replicate", dp_replicate)):
            if value != 1:
                raise ValueError(f"{name}={value} needs {name} processes or a multiple: launch with "
                                 f"torchrun --nproc-per-node N -m softmoe train ... (WORLD_SIZE is not set)")
        micro_batches(micro_batch_size, batch_size, 1)
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world} (torchrun's --nproc-per-node x nodes)")
    if (world // ep_size) % dp_replicate:
        raise ValueError(f"dp_replicate={dp_replicate} must divide world / ep_size = {world} / {ep_size} = "
                         f"{world // ep_size} (the dp ranks are dp_replicate x dp_shard)")
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}: each rank takes "
                         f"batch_size / world of the same global batch")
    micro_batches(micro_batch_size, batch_size, world)
    if world == 1:
        return None
    if not dist.is_initialized():
        smd.init_process_group(timeout_s=timeout_s)
    return smd.init_mesh(ep_size, dp_replicate, timeout_s=timeout_s, io_timeout_s=io_timeout_s)


def parallelize(model: nn.Module, mesh, data_parallel: str) -> nn.Module | None:
    """Shard the meta `model` over `mesh`: experts over "ep" (in place), then FSDP2 on every
    block, the experts and the root ("fsdp"), or nothing more ("ddp": the DDP wrapper is made by
    `ddp_wrapper` once the model is materialised). Returns `model`."""
    smd.parallelize(model, mesh)
    if data_parallel == "fsdp":
        smd.apply_fsdp(model, mesh)
    return model


def ddp_wrapper(model: nn.Module, data_parallel: str):
    """The DDP module to call forward on ("ddp": it averages the replicated parameters' gradients,
    bucketed and overlapped with backward; the expert shards are left out), or None."""
    if data_parallel != "ddp":
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, smd.ignored_params(model))
    return DDP(model, broadcast_buffers=False)


def has_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def close_process_group(finished: bool = False) -> None:
    """Destroy every process group if one exists (their gloo/NCCL threads would otherwise
    abort the process at exit, turning a clean exit status into SIGABRT).

    finished: the run ended normally on this rank, so every rank is about to close too: wait
    for all of them at a barrier first, so that no rank shuts its connections down while a peer
    is still inside a collective or its backend is still using them. On an error path (a rank
    died, a collective timed out) there is no barrier: it would only wait out the timeout.
    Before the groups go, the run's garbage (FSDP/DTensor state that holds group handles, in
    reference cycles) is collected, so no process group is finalised during interpreter
    shutdown, when its worker threads can no longer take the GIL."""
    if not has_process_group():
        return
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


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


def micro_batches(micro_batch_size: int, batch_size: int, world: int) -> int:
    """k: each rank's batch_size / world rows run as k micro-batches of micro_batch_size rows
    (0: one, no accumulation). ValueError naming micro_batch_size when it does not divide them."""
    local = batch_size // world
    if not micro_batch_size:
        return 1
    if micro_batch_size > local or local % micro_batch_size:
        raise ValueError(f"micro_batch_size={micro_batch_size} must divide each rank's batch of batch_size / world = "
                         f"{batch_size} / {world} = {local} rows (0: no gradient accumulation)")
    return local // micro_batch_size


@contextlib.contextmanager
def gradient_sync(run, enabled: bool):
    """Around one micro-batch's forward and backward: `enabled` False (every micro-batch but a
    step's last) keeps the gradients local, accumulating: FSDP2 skips its reduce-scatter
    (`set_requires_gradient_sync(False)` on the root, recursively: blocks and experts), DDP its
    all-reduce (`no_sync()`). The last micro-batch's backward reduces the accumulated sum."""
    if run.mesh is None:
        yield
    elif smd.is_fsdp(run.model):
        run.model.set_requires_gradient_sync(enabled)
        yield
    elif run.ddp is not None and not enabled:
        with run.ddp.no_sync():
            yield
    else:
        yield


def num_params(model: nn.Module) -> int:
    """Parameters of the whole model (a DTensor counts its global size)."""
    return sum(p.numel() for p in model.parameters())


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over every rank (a local-batch mean becomes the global-batch mean)."""
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


RNG_DIR = "rng"


def rng_file(rank: int) -> str:
    """Where a parallel checkpoint keeps rank `rank`'s RNG states (relative to step_N/)."""
    return f"{RNG_DIR}/rank_{rank}.pt"


class PendingSave:
    """A parallel checkpoint whose DCP shards are being written in the background
    (`checkpoint_async`). `wait()` (collective) finishes it: the COMPLETE marker, then rank 0's
    files and the rename to step_N, then the pruning; `abandon()` (error path) never renames."""

    def __init__(self, path: Path, dcp_save, finish) -> None:
        self.path, self._dcp, self._finish = path, dcp_save, finish
        self._done = False

    def wait(self) -> Path:
        if not self._done:
            self._dcp.wait()
            self._finish()
            self._done = True
        return self.path

    def abandon(self) -> None:
        self._dcp.abandon()
        self._done = True


def save_parallel(final: Path, model: nn.Module, optimizer, train_state: dict, train_config: dict, keep: int,
                  mesh, async_save: bool = False) -> Path | PendingSave:
    """Write the parallel checkpoint `final` (collective). Every rank writes its RNG states
    (`train_state["rng"]`, each rank its own) to rng/rank_<r>.pt and its DCP shards into a
    hidden temporary directory; rank 0 adds the model config, the train config and the train
    state (with rank 0's RNG states and `rng_ranks`, the world size) and renames it to `final`
    only when all of it is on disk. The leftovers of an interrupted save (`.tmp-*`) are removed
    first. The barriers and DCP's coordination run on `mesh.io_group` (the checkpoint timeout).

    async_save: the shards are written in the background from a CPU snapshot (DCP's
    async_save) and a PendingSave is returned at once; its `wait()` (every rank, before the
    next save and before the run ends) does the rest. Until then there is no `final`."""
    from softmoe._io import atomic_write

    root = final.parent
    tmp = root / f".tmp-{final.name}-parallel"
    group = mesh.io_group
    if mesh.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # an interrupted save's (no save is in flight: the last was waited for)
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier(group=group)
    own = {"rank": mesh.rank, "world_size": mesh.world_size, "step": train_state["step"], "rng": train_state["rng"]}
    atomic_write(tmp / rng_file(mesh.rank), lambda path: torch.save(own, path))
    train_state = dict(train_state, rng_ranks=mesh.world_size)
    extra = {"step": train_state["step"]}

    def finish() -> None:
        _finish_parallel(final, tmp, model.config, train_state, train_config, keep, mesh)

    if async_save:
        return PendingSave(final, smd.async_save_checkpoint(tmp / DCP_DIR, model, optimizer, extra=extra,
                                                            process_group=group), finish)
    smd.save_checkpoint(tmp / DCP_DIR, model, optimizer, extra=extra,
                        process_group=group)  # ends in a barrier: every shard and rng file is on disk
    finish()
    return final


def _finish_parallel(final: Path, tmp: Path, model_config, train_state: dict, train_config: dict, keep: int,
                     mesh) -> None:
    """Rank 0: the model config, train config and train state into `tmp`, the rename to
    `final`, the pruning to `keep` checkpoints; then a barrier (collective)."""
    from softmoe._io import atomic_write, atomic_write_json
    from softmoe.models.hub import TRAIN_CONFIG, TRAIN_STATE, list_checkpoints, save_config

    root = final.parent
    if mesh.rank == 0:
        try:
            save_config(model_config, tmp)
            atomic_write_json(tmp / TRAIN_CONFIG, train_config, sort_keys=True)
            atomic_write(tmp / TRAIN_STATE, lambda path: torch.save(train_state, path))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for _, old in list_checkpoints(root.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier(group=mesh.io_group)


def rng_to_restore(checkpoint: Path, train_state: dict, mesh, log) -> dict:
    """The RNG states this rank resumes with from `checkpoint` (docs/distributed.md).

    A parallel checkpoint holds every rank's (rng/rank_<r>.pt; `rng_ranks` in train_state.pt:
    how many). At the same world size rank r takes rank r's, whatever the (dp, ep) split; every
    rank checks that all of the files are there, so all of them fail alike: a missing one is a
    ValueError naming it. At another world size (one process included) every rank takes rank
    0's (train_state.pt's, the rule of single-process checkpoints and older parallel ones) and
    `log` says so."""
    saved = train_state.get("rng_ranks")
    world = 1 if mesh is None else mesh.world_size
    rank = 0 if mesh is None else mesh.rank
    if saved is None:  # a single-process checkpoint (or a parallel one of an older softmoe): one state
        return train_state["rng"]
    if saved != world:
        log(f"the checkpoint holds the RNG states of {saved} ranks and this run has {world}: every rank resumes "
            f"with rank 0's (the RNG rule of a layout change, docs/distributed.md)")
        return train_state["rng"]
    from softmoe.train.checkpoint import load_state_file

    missing = [name for name in map(rng_file, range(world)) if not (checkpoint / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is missing its RNG state file {missing[0]!r} (a parallel "
                         f"checkpoint of {saved} ranks holds rng/rank_0.pt .. rng/rank_{saved - 1}.pt, one per "
                         f"rank; a partial copy?); it cannot be resumed at {world} ranks")
    path = checkpoint / rng_file(rank)
    own = load_state_file(path, "RNG state")
    if not isinstance(own, dict) or own.get("rank") != rank or own.get("world_size") != world or "rng" not in own:
        raise ValueError(f"{str(path)!r} is not rank {rank}'s RNG state of a {world}-rank run: it holds "
                         f"rank={own.get('rank') if isinstance(own, dict) else None!r}, world_size="
                         f"{own.get('world_size') if isinstance(own, dict) else None!r}")
    return own["rng"]


def load_any(checkpoint: Path, model: nn.Module, optimizer, train_state: dict, mesh) -> None:
    """Weights and optimizer state of `checkpoint` into `model` (parallel at any layout, or one
    process): a parallel run's DCP shards (dcp/), or a single-process run's whole tensors
    (model.safetensors + the optimizer in train_state.pt: each rank keeps its blocks)."""
    from softmoe.models.hub import WEIGHTS_NAME, load_safetensors

    if (checkpoint / DCP_DIR).is_dir():
        smd.load_checkpoint(checkpoint / DCP_DIR, model, optimizer, process_group=getattr(mesh, "io_group", None))
        return
    if (checkpoint / SHARDED).is_dir():
        raise ValueError(f"checkpoint {str(checkpoint)!r} is in the hand-made sharded format of an older softmoe "
                         f"({SHARDED}/); this softmoe resumes DCP checkpoints ({DCP_DIR}/) and single-process ones "
                         f"(its {WEIGHTS_NAME} holds the weights but not the optimizer state)")
    if "optimizer" not in train_state:
        raise ValueError(f"checkpoint {str(checkpoint)!r} has no optimizer state (train_state.pt) and no {DCP_DIR}/")
    smd.load_full_state_dict(model, load_safetensors(checkpoint / WEIGHTS_NAME))
    optimizer.load_state_dict(smd.shard_optimizer_state(model, optimizer, train_state["optimizer"]))


def finish_step(run, loss: torch.Tensor, correct: torch.Tensor, rows: int, aux, max_norm: float, result):
    """After this rank's (last micro-batch's) backward: the gradients of the global batch
    (FSDP2 reduce-scattered them, but for the 0-dim ones; DDP averaged the replicated ones, the
    expert shards are summed over their dp group here), clip by the global norm, update. `loss`,
    `correct`, `aux`: this rank's values over its `rows` rows; the returned `result`
    (trainer._StepResult) holds global-batch values."""
    if smd.is_fsdp(run.model):
        smd.sync_ignored_gradients(run.model)
    else:
        smd.sync_gradients(run.model, replicated=run.ddp is None)
    grad_norm = smd.clip_grad_norm_(run.params, max_norm)
    run.optimizer.step()
    return result(reduce_mean(loss), grad_norm.detach(), reduce_sum(correct), rows * run.mesh.world_size,
                  None if aux is None else reduce_mean(aux))


class NullWriter:
    """The metrics writer of ranks other than 0: they log nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass
