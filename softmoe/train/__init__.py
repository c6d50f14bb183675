"""Training: TrainConfig, the optimiser recipe of the paper, checkpoints and the loop."""
from .checkpoint import latest_checkpoint, load_model
from .config import ModelConfig, TrainConfig, apply_overrides, available_configs, load_config
from .trainer import TrainingDiverged, evaluate, train

__all__ = ["TrainConfig", "ModelConfig", "apply_overrides", "load_config", "available_configs", "train", "evaluate",
           "TrainingDiverged", "latest_checkpoint", "load_model"]
