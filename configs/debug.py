"""A run of a few seconds on digits: checks that the whole pipeline works."""
from softmoe.train import ModelConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig("soft_moe_micro", {"patch_size": 2}),
        data="digits", augment="crop_flip",
        steps=20, batch_size=64, lr=1e-3, schedule="cosine", warmup_steps=2,
        log_every=5, checkpoint_every=10, routing_metrics_every=5, keep_checkpoints=2,
        workdir="runs/debug",
    )
