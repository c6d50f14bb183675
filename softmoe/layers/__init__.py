"""MoE layers: router -> dispatch -> experts -> combine, each in its own small file; the math
of each step in `functional`, each component's speed path in `fused` (`impl="fused"` /
`"reference"`)."""
from . import functional as functional
from . import fused as fused
from .causal_soft_moe import CausalSoftMoE, CausalSoftMoEState
from .common import MoELayer, collect_aux_loss, collect_metrics, moe_layers, record_routing
from .experts import Experts
from .experts_choice import ExpertsChoiceMoE
from .fused import IMPLS, BufferPool, pooled_bytes, release_buffers, set_buffer_reuse
from .router import Gate, SoftRouter, SoftRouting
from .soft_moe import SoftMoE
from .tokens_choice import TokensChoiceMoE

__all__ = ["MoELayer", "Experts", "SoftRouter", "SoftRouting", "Gate", "SoftMoE", "CausalSoftMoE",
           "CausalSoftMoEState", "TokensChoiceMoE", "ExpertsChoiceMoE",
           "collect_aux_loss", "collect_metrics", "record_routing", "moe_layers", "IMPLS", "BufferPool",
           "pooled_bytes", "release_buffers", "set_buffer_reuse"]
