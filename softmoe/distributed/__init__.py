"""Expert parallelism x data parallelism on torch.distributed (docs/distributed.md, docs/design.md §6).

    from softmoe import distributed as smd
    smd.init_process_group()                     # torchrun env, or init_method=..., rank, world_size
    mesh = smd.init_mesh(ep_size=4)              # DeviceMesh (dp, ep); dp_replicate=R: HSDP (R, dp/R, ep)
    with torch.device("meta"):
        model = create_model(...)                # nothing allocated
    smd.parallelize(model, mesh)                 # experts: DTensors Shard(0) over "ep", in place
    smd.apply_fsdp(model, mesh)                  # FSDP2: experts over "dp", blocks + root over all ranks
    smd.materialize(model, device, seed=0)       # local shards only, same numbers at every layout
    smd.key_noise_by_global_rows(model, (rank * b, (rank + 1) * b), B)  # router noise = one process's
    ...loss.backward(); smd.sync_ignored_gradients(model); smd.clip_grad_norm_(params, 1.0); optimizer.step()
    smd.save_checkpoint(path, model, optimizer)  # DCP: loads at any layout, or in one process

Without FSDP: `smd.sync_gradients(model)` after backward (the tests' oracle), or DDP with
`ignored_params`. Nothing here runs at import; a model never parallelised is untouched.
"""
from .checkpoint import (PendingCheckpoint, async_save_checkpoint, load_checkpoint, load_full_state_dict,
                         save_checkpoint, shard_optimizer_state)
from .expert_parallel import all_to_all, expert_offset, is_sharded, local, local_region, shard_experts
from .fsdp import apply_fsdp, clip_grad_norm_, is_fsdp, sync_ignored_gradients
from .init import init_weights, materialize, param_key
from .mesh import Mesh, init_mesh, init_process_group, shard_batch
from .noise import GlobalRowNoise, MicroBatchNoise, key_noise_by_global_rows, select_micro_batch
from .parallelize import (broadcast_parameters, expert_parameters, ignored_params, mesh_of, parallelize,
                          replicated_parameters, sync_gradients)

__all__ = ["init_process_group", "init_mesh", "Mesh", "shard_batch", "parallelize", "all_to_all",
           "shard_experts", "is_sharded", "local", "local_region", "expert_offset", "apply_fsdp", "is_fsdp",
           "clip_grad_norm_",
           "sync_ignored_gradients", "sync_gradients", "broadcast_parameters", "expert_parameters",
           "replicated_parameters", "ignored_params", "mesh_of", "save_checkpoint", "load_checkpoint",
           "async_save_checkpoint", "PendingCheckpoint",
           "load_full_state_dict", "shard_optimizer_state",
           "init_weights", "materialize", "param_key", "key_noise_by_global_rows", "GlobalRowNoise",
           "MicroBatchNoise", "select_micro_batch"]
