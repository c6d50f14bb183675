"""(b) the layer benchmark on the device, (c) training img/s of a Soft MoE ViT against its dense ViT."""
from __future__ import annotations

import statistics
import types

import torch

from softmoe.bench import matmul_gflops
from softmoe.bench.layer.command import device_peaks, measure_shape
from softmoe.bench.layer.impls import available_impls
from softmoe.bench.layer.shape import Shape

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_rows(device: torch.device, dtypes: list[str], batches: list[int], experts: list[int], base: dict,
               repeats: int, compile_: bool, peak_tflops: float | None, peak_gbs: float | None,
               mm_n: int | None = None) -> list[dict]:
    """`softmoe bench layer`'s rows (all installed implementations, one process, CUDA events,
    2 warm-up rounds, medians of `repeats`) per (dtype, B, E), tagged with dtype, B and compile.
    `mm_n`: the square matmul whose rate is the reference (None: 2048 on a CPU, 8192 on a GPU)."""
    impls = [i.name for i in available_impls() if i.name != "naive-loop"]
    rows = []
    for dtype in dtypes:
        n = mm_n or (2048 if device.type == "cpu" else 8192)
        mm = matmul_gflops(n=n, dtype=_TORCH_DTYPES[dtype], device=device)
        peaks = device_peaks(str(device), dtype, peak_tflops, peak_gbs)
        for compiled in ([False, True] if compile_ else [False]):
            for b in batches:
                for e in experts:
                    s = Shape(**dict(base, batch=b), experts=e, device=str(device), dtype=dtype, compile=compiled)
                    for r in measure_shape(s, impls, repeats, torch.get_num_threads(), mm, memory=False,
                                           same_process=True, peaks=peaks):
                        rows.append({"dtype": dtype, "compile": compiled, "B": b, **r, "mm_GFLOPs": mm})
    return rows


def train_img_per_s(device: torch.device, model_name: str, batch: int, steps: int, img_size: int, bf16: bool,
                    overrides: dict | None = None) -> float:
    """Images per second of the trainer's own step (softmoe.train.trainer._train_step: autocast,
    loss, backward, clipping, AdamW) on synthetic images, median over `steps` timed steps
    after 3 warm-up steps; CUDA: device time between events."""
    from softmoe.layers import moe_layers
    from softmoe.models import create_model
    from softmoe.train import TrainConfig
    from softmoe.train import trainer as trainer_mod
    from softmoe.train.config import ModelConfig
    from softmoe.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, img_size=img_size, **(overrides or {})).to(device).train()
    cfg = TrainConfig(model=ModelConfig(model_name, dict(overrides or {})), data="digits", device=str(device),
                      bf16=bf16, batch_size=batch, img_size=img_size)
    run = types.SimpleNamespace(cfg=cfg, model=model, optimizer=build_optimizer(model, cfg), mesh=None, ddp=None,
                                micro_batches=1,
                                params=[p for p in model.parameters() if p.requires_grad],
                                moe=[m for _, m in moe_layers(model)],
                                autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    times = []
    for i in range(3 + steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            trainer_mod._train_step(run, x, y, 1e-4, routing=False)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            import time

            t0 = time.perf_counter()
            trainer_mod._train_step(run, x, y, 1e-4, routing=False)
            seconds = time.perf_counter() - t0
        if i >= 3:
            times.append(seconds)
    return batch / statistics.median(times)
