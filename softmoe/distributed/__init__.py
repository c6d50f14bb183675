"""Expert parallelism x data parallelism on torch.distributed (docs/distributed.md, docs/design.md §6).

    from softmoe import distributed as smd
    smd.init_process_group()                     # torchrun env, or init_method=..., rank, world_size
    with torch.device("meta"):
        model = create_model(...)                # nothing allocated
    model = smd.parallelize(model, ep_size=4)    # experts sharded over 4 ranks, the rest replicated
    smd.materialize(model, device, seed=0)       # local shards only, same numbers at every layout
    smd.key_noise_by_global_rows(model, (rank * b, (rank + 1) * b), B)  # router noise = one process's
    ...loss.backward(); smd.sync_gradients(model); optimizer.step()
    smd.save_checkpoint(path, model, optimizer)  # layout-independent: loads at any ep_size, or unparallelised

Nothing here runs at import; a model never parallelised is untouched.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .expert_parallel import ExpertParallel, shard_experts
from .init import init_weights, materialize, param_key
from .mesh import Mesh, init_mesh, init_process_group, shard_batch
from .noise import GlobalRowNoise, key_noise_by_global_rows
from .parallelize import (broadcast_parameters, expert_parameters, ignored_params, mesh_of, parallelize,
                          replicated_parameters, sync_gradients)

__all__ = ["init_process_group", "init_mesh", "Mesh", "shard_batch", "parallelize", "ExpertParallel",
           "shard_experts", "sync_gradients", "broadcast_parameters", "expert_parameters", "replicated_parameters",
           "ignored_params", "mesh_of", "save_checkpoint", "load_checkpoint",
           "init_weights", "materialize", "param_key", "key_noise_by_global_rows", "GlobalRowNoise"]
