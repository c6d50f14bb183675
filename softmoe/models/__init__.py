"""Model zoo: ViT / Soft MoE / Tokens Choice / Experts Choice vision transformers.

    from softmoe.models import create_model, list_models
    model = create_model("soft_moe_s16", num_classes=10)
    model = create_model("soft_moe_s16", moe={"num_experts": 32, "slots_per_expert": 4})
"""
from .config import MoEConfig, ViTConfig
from .profile import count_flops, count_params, flop_breakdown, param_breakdown, profile_model
from .registry import create_model, get_config, list_models, register_model
from .vit import VisionTransformer, build_model

# --- checkpoint / interop exports (softmoe/models/hub.py etc., wired by the lead) ---
from .hub import from_pretrained, load_model, load_weights, resample_pos_embed, save_pretrained
from .pretrained import list_pretrained
from .timm_interop import register_timm_models, timm_to_moe
from .upcycle import upcycle, upcycling_gap

__all__ = ["create_model", "list_models", "register_model", "get_config", "build_model", "ViTConfig", "MoEConfig",
           "load_model", "VisionTransformer", "count_params", "count_flops", "param_breakdown", "flop_breakdown",
           "profile_model", "save_pretrained", "from_pretrained", "list_pretrained", "load_weights",
           "resample_pos_embed", "upcycle", "upcycling_gap", "timm_to_moe", "register_timm_models"]
