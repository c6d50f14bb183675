"""CIFAR-10 from scratch with a small Soft MoE ViT (width 64, 4 blocks, MoE in the last two).

Data: `data_root` may hold the CIFAR binary batches (cifar-10-batches-bin/) or an ImageFolder
(train/ and test/); with torchvision installed, --set download=true fetches it. Example:
  softmoe train --config cifar10 --set data_root=../shared/datasets/cifar10
"""
from softmoe.train import ModelConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model=ModelConfig("soft_moe_micro", {"patch_size": 4}),  # 64 tokens, 8 experts x 1 slot
        data="cifar10", augment="crop_flip", crop_padding=4,
        epochs=30, batch_size=128, lr=1e-3, schedule="cosine", warmup_steps=500,
        weight_decay=0.03, grad_clip=1.0, label_smoothing=0.1,
        eval_every=2000, checkpoint_every=1000, log_every=50,
        workdir="runs/cifar10",
    )
