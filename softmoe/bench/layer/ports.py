"""The two PyPI Soft MoE ports, built at a benchmark shape (installed with --no-deps, optional)."""
from __future__ import annotations

import functools
import importlib.util
import os

from torch import nn

from .naive import expert_mlp
from .shape import Shape


def load_soft_moe_port():
    """bwconrad's `soft_moe/soft_moe.py`, loaded by file: the package `__init__` also imports
    its ViT, which needs timm, and the layer itself does not."""
    spec = importlib.util.find_spec("soft_moe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("soft-moe is not installed (pip install --no-deps soft-moe)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "soft_moe.py")
    mod_spec = importlib.util.spec_from_file_location("_softmoe_bench_port_soft_moe", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def build_lucidrains(s: Shape) -> nn.Module:
    """lucidrains' `soft_moe_pytorch.SoftMoE` (`pip install soft-moe-pytorch`)."""
    from soft_moe_pytorch import SoftMoE as LucidSoftMoE

    mult = s.hidden / s.dim
    if int(s.dim * mult) != s.hidden:
        raise ValueError(f"soft-moe-pytorch needs hidden = dim * mult exactly, got hidden={s.hidden}, dim={s.dim}")
    # No CPU offloading (it moves every expert on every forward) and no torch.distributed.
    return LucidSoftMoE(s.dim, num_experts=s.experts, num_slots=s.slots, expert_mult=mult,
                        is_distributed=False, offload_unused_experts_to_cpu=False)


def build_bwconrad(s: Shape) -> nn.Module:
    """bwconrad's `SoftMoELayerWrapper` (`pip install soft-moe`) with the baseline's expert MLP."""
    port = load_soft_moe_port()
    return port.SoftMoELayerWrapper(dim=s.dim, num_experts=s.experts, slots_per_expert=s.slots,
                                    layer=functools.partial(expert_mlp, s.dim, s.hidden))
