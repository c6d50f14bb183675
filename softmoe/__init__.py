"""softmoe: Soft Mixtures of Experts (Puigcerver et al., ICLR 2024) for PyTorch."""
from .layers import (CausalSoftMoE, Experts, ExpertsChoiceMoE, MoELayer, SoftMoE, TokensChoiceMoE, collect_aux_loss,
                     collect_metrics, moe_layers, record_routing, release_buffers, set_buffer_reuse)

__version__ = "0.1.0"
__all__ = ["SoftMoE", "CausalSoftMoE", "TokensChoiceMoE", "ExpertsChoiceMoE", "Experts", "MoELayer", "collect_aux_loss",
           "collect_metrics", "record_routing", "moe_layers", "release_buffers", "set_buffer_reuse", "__version__"]
