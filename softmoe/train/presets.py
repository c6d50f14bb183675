"""Built-in configs that must work without the repository's configs/ folder (an installed
wheel has none): the `softmoe demo` pair. configs/demo.py returns the same."""
from __future__ import annotations

from .config import ModelConfig, TrainConfig

# Tuned on 2 shared CPU cores (see the report in the training docs):
# - 8x8 digits with patch 2 -> 16 tokens; Soft MoE in blocks 2-3 with 16 experts x 1 slot, so
#   slots = tokens (the paper's advice: experts ~ tokens).
# - No augmentation: a 1-pixel shift on an 8x8 digit moves every 2x2 patch, and with this
#   budget it cost ~40 points of accuracy; flips are wrong for digits anyway.
# - Weight decay 1.0 (decoupled, times the lr): the 1438-image train set overfits with the
#   paper's 0.03 (ViT 93% vs 96-98% with 1.0).
# - One thread: these models are too small to gain from two, and two threads on a loaded
#   machine were 10x slower (OpenMP spin-waiting).
DEMO_STEPS = 800
DEMO_BATCH = 64


def demo_config(model: str = "soft_moe_micro", workdir: str | None = None, steps: int = DEMO_STEPS) -> TrainConfig:
    overrides = {"patch_size": 2}
    if "moe" in model:
        overrides["moe"] = {"num_experts": 16}
    return TrainConfig(
        model=ModelConfig(model, overrides),
        data="digits", augment="none",
        steps=steps, batch_size=DEMO_BATCH, lr=3e-3, schedule="cosine",
        warmup_steps=min(max(1, steps // 10), steps - 1),  # 0 for a 1-step run
        weight_decay=1.0, grad_clip=1.0,
        num_threads=1, log_every=20, eval_every=200, routing_metrics_every=50, checkpoint_every=200,
        keep_checkpoints=2, workdir=workdir or f"runs/demo/{model.replace('_micro', '')}",
    )
