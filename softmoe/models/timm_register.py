"""Importing this module registers every softmoe model with timm (`register_timm_models()`, see
timm_interop). Its one purpose is tools that can only be told a module to import, above all
timm's `train.py --device-modules softmoe.models.timm_register` (train.py imports the modules
named there before it builds the model; docs/models.md). softmoe itself never imports it, so
`import softmoe` stays free of timm."""
from .timm_interop import register_timm_models

MODELS: list[str] = register_timm_models()  # the names now available through timm.create_model

__all__ = ["MODELS"]
