"""Activation checkpointing and torch.compile of a model's transformer blocks, applied from
outside the model, before FSDP wrapping (torchtitan's apply_ac / apply_compile; docs/design.md
§6.1 says why "selective" is split where it is, docs/distributed.md "Gradient accumulation,
activation checkpointing, compile" what is tested):

    with torch.device("meta"):
        model = create_model(...)
    apply_activation_checkpointing(model, "selective")   # hooks on the blocks, names unchanged
    compile_blocks(model)                                # each block's forward through torch.compile
    smd.parallelize(model, mesh); smd.apply_fsdp(model, mesh); smd.materialize(model, device, seed)

Neither changes a module name or the module tree (no wrapper modules: state dicts, DCP
checkpoints and the init keyed by parameter name are those of the plain model), and neither
touches the layers' code.

    "full"       every block (`model.blocks[i]`) runs under non-reentrant activation
                 checkpointing (`torch.distributed._composable.checkpoint`: forward hooks, no
                 wrapper): only the block's input is kept, the block is recomputed in the backward
    "selective"  every block's attention (`block.attn`: qkv, q/k norms, attention, projection) is
                 recomputed; the MLP / MoE layer keeps its activations, so nothing of the MoE layer
                 is recomputed: under expert parallelism its all-to-all outputs are saved and no
                 all-to-all is redone in the backward

Checkpointing preserves the RNG state (the CPU's, and the device's of the block's input) and
restores it for the recompute, so router noise drawn from the global RNG, `GlobalRowNoise` and
`MicroBatchNoise` give the recomputed forward the original forward's values; an MoE layer's
`publish` ignores a recompute (the aux loss and metrics stay those of the original forward).
"""
from __future__ import annotations

import torch
from torch import nn

from softmoe.distributed.fsdp import transformer_blocks

CHECKPOINT_MODES = ("none", "full", "selective")


def _blocks(model: nn.Module, what: str) -> list[nn.Module]:
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{what} needs a model with transformer blocks (a ModuleList `model.blocks`), "
                         f"got {type(model).__name__} without one")
    return blocks


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint `model`'s transformer blocks as `mode` ("none", "full", "selective"; module
    docstring) says, in place; returns `model`. Apply before FSDP (fully_shard) and before
    `compile_blocks`; on the meta device or a built model."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation_checkpoint must be one of {list(CHECKPOINT_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    from torch.distributed._composable import checkpoint

    blocks = _blocks(model, f"activation_checkpoint={mode!r}")
    if mode == "selective" and not all(isinstance(getattr(b, "attn", None), nn.Module) for b in blocks):
        raise ValueError("activation_checkpoint='selective' recomputes each block's attention (`block.attn`); "
                         "this model's blocks have none: use 'full'")
    for block in blocks:
        checkpoint(block if mode == "full" else block.attn)  # non-reentrant, RNG state preserved
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Run every transformer block's forward through `torch.compile(**compile_kwargs)` (per
    block, not the whole model). Module hooks (FSDP's, activation checkpointing's) stay outside
    the compiled code, eager: a block whose children carry checkpoint hooks ("selective": its
    attention) has each child's forward compiled instead of its own (dynamo does not trace a
    checkpoint region's hooks correctly: the recompute would not match). In place; returns
    `model`. The compiled forward is an instance attribute: module names and parameters are
    unchanged. Apply after `apply_activation_checkpointing`, before FSDP."""
    for block in _blocks(model, "compile"):
        units = list(block.children()) if any(_checkpointed(m) for m in block.children()) else [block]
        for unit in units:
            unit.forward = torch.compile(unit.forward, **compile_kwargs)
    return model


def _checkpointed(module: nn.Module) -> bool:
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(module) or {})
