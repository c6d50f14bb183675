"""A character-level language model on Python's own documentation (`pydoc_data.topics`, ships
with CPython: no download), held-out bits per character teacher-forced and prefix-only.

  softmoe train --config charlm                                   # causal Soft MoE decoder
  softmoe train --config charlm --set model=gpt_micro             # the dense baseline
  softmoe train --config charlm --set data=path/to/text_or_folder  # any corpus
  softmoe generate runs/charlm/model --prompt "The for statement" --tokens 200
"""
from softmoe.train import ModelConfig, TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        task="lm",
        # 4 blocks, width 64, context 128; CausalSoftMoE in the last two blocks: 4 experts x 1
        # slot per chunk of 4 tokens (slots = tokens: the dense MLP's FLOPs, 4x its parameters)
        model=ModelConfig("soft_moe_gpt_micro", {"num_experts": 4}),
        data="pydoc",
        steps=600, batch_size=32, lr=3e-3, schedule="cosine", warmup_steps=50, min_lr=3e-4,
        weight_decay=0.1, grad_clip=1.0, log_every=50, eval_batch_size=64,
        workdir="runs/charlm",
    )
