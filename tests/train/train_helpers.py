"""Shared by the training tests: a tiny config whose steps take milliseconds."""
import torch

from softmoe.train import TrainConfig
from softmoe.train.config import ModelConfig

TINY_MODEL = {"patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_dim": 64, "moe": {"num_experts": 4}}


def tiny_config(device: str | torch.device = "cpu", **changes) -> TrainConfig:
    """A Soft MoE ViT of ~30k parameters on digits (4 tokens of 4x4 pixels, 4 experts), run on
    `device` (the tests pass the `device` fixture: SOFTMOE_TEST_DEVICE, tests/conftest.py) in
    float32 unless `bf16=True` is among the changes."""
    base = dict(model=ModelConfig("soft_moe_micro", dict(TINY_MODEL)), data="digits", augment="crop_flip",
                steps=12, batch_size=32, lr=1e-3, schedule="cosine", warmup_steps=2, log_every=2,
                checkpoint_every=4, keep_checkpoints=3, routing_metrics_every=3, eval_batch_size=256,
                tensorboard=False, plots=False, num_threads=1,
                # explicit: on a GPU machine "auto" would switch these runs to CUDA + bf16
                device=str(device), bf16=False)
    base.update(changes)
    return TrainConfig(**base)
