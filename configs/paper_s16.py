"""The paper's pre-training recipe (docs/design.md §4) for Soft MoE-S/16 (128 experts in blocks 6-11).

Adam (0.9, 0.999), global-norm clipping 1.0, batch 4096, 224 px, inception crop + flip, values
in [-1, 1]; decoupled weight decay scaled by the learning rate: 0.03 on kernels and the router
scale, 3.0 on the head kernel, none on phi, biases, norms and the position embedding. rsqrt
schedule: linear warmup to 1e-3 over 10k steps, peak / sqrt(1 + (step - 10k) / 10k), linear
cooldown to 0 over the last 50k steps; sigmoid cross-entropy. The paper trains on JFT-4B; any
ImageFolder directory can stand in: --set data=/path/to/imagenet (train/ + val/).
The total number of steps is not part of the recipe written down in docs/design.md §4 (it is the
compute budget): 300k here; change it with --set steps=N (keep it > 60k for warmup + cooldown).
Data is held in memory as uint8 (N, C, H, W): for an ImageFolder of varying image sizes add
--set data_image_size=256 (resized once while decoding, then inception-cropped to 224), and
make sure N * 3 * 256 * 256 bytes fit in RAM.
"""
from softmoe.train import TrainConfig


def config() -> TrainConfig:
    return TrainConfig(
        model="soft_moe_s16",
        data="cifar10", img_size=224, augment="inception_crop", inception_area_min=0.05,
        steps=300_000, batch_size=4096,
        optimizer="adamw", lr=1e-3, beta1=0.9, beta2=0.999,
        weight_decay=0.03, head_weight_decay=3.0, grad_clip=1.0,
        schedule="rsqrt", warmup_steps=10_000, rsqrt_timescale=10_000, cooldown_steps=50_000,
        loss="sigmoid", label_smoothing=0.0,
        bf16=None,  # bf16 autocast on GPU, float32 on CPU
        log_every=50, eval_every=10_000, checkpoint_every=1000, keep_checkpoints=3,
        workdir="runs/paper_s16",
    )
