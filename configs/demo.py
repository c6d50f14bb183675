"""The `softmoe demo` Soft MoE run: soft_moe_micro on the embedded 8x8 digits, ~1 minute on 2 CPU
cores. `--set model=vit_micro --set model.moe=none --set workdir=runs/demo/vit` gives its dense
counterpart."""
from softmoe.train import TrainConfig
from softmoe.train.presets import demo_config


def config() -> TrainConfig:
    return demo_config("soft_moe_micro")
