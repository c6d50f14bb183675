"""The training loop: `train(cfg)` runs a TrainConfig in a work directory and resumes it exactly.

Exact resume: model init, data order and augmentation are functions of the seed and the step
(softmoe.data.loader), the learning rate is a function of the step, and a checkpoint holds the
weights, the optimizer state and every RNG state. On the CPU with a fixed thread count a run
killed at any point and resumed ends with bitwise the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from softmoe._io import atomic_write_json
from softmoe._lock import workdir_lock
from softmoe.layers import (collect_aux_loss, collect_metrics, moe_layers, record_routing, release_buffers,
                            set_buffer_reuse)

from . import checkpoint as ckpt_mod
from . import logs
from .config import TrainConfig
from .optim import build_optimizer, make_schedule, set_lr

# Fields that may differ when resuming: they change what is logged or saved, never the weights.
RESUMABLE_CHANGES = {"log_every", "eval_every", "eval_batch_size", "routing_metrics_every", "checkpoint_every",
                     "keep_checkpoints", "tensorboard", "plots", "workdir", "num_threads", "device",
                     "reuse_buffers"}


GPU_DATASET_BYTES = 4 * 2**30  # uint8 train images up to this size are copied to the GPU once


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; nothing was saved after the last good step."""

    exit_code = 1  # `softmoe train` / `softmoe demo` exit status (bad input exits 2)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def prepare_workdir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that files can be written in it."""
    workdir = Path(path)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"work directory {str(workdir)!r} is not writable: {e.strerror or e}") from e
    return workdir


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0
                        ) -> torch.Tensor:
    """Mean over the batch of softmax cross-entropy, or of sigmoid (binary) cross-entropy summed
    over classes (the paper's JFT loss). logits (B, C) float32, labels (B,) int64."""
    if kind == "softmax":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if kind == "sigmoid":
        num_classes = logits.shape[-1]
        targets = F.one_hot(labels, num_classes).to(logits.dtype)
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
    raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {kind!r}")


@torch.no_grad()
def evaluate(model: nn.Module, dataset, img_size: int, batch_size: int, device: torch.device, autocast,
             loss_kind: str = "softmax") -> dict:
    """Accuracy and mean loss over the whole `dataset` (eval mode, no augmentation)."""
    from softmoe.data import eval_batches

    was_training = model.training
    model.eval()
    correct, total_loss, n = 0, 0.0, 0
    for x, y in eval_batches(dataset, batch_size, img_size, device):
        with autocast():
            logits = model(x)
        logits = logits.float()
        total_loss += float(classification_loss(logits, y, loss_kind)) * len(y)
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    model.train(was_training)
    return {"test_accuracy": correct / n, "test_loss": total_loss / n, "test_examples": n}


def resolve_config(cfg: TrainConfig, train_ds, workdir: Path) -> TrainConfig:
    """The config with everything the data decides filled in (img_size, in_chans,
    num_classes), so that config.json alone rebuilds the same run."""
    h, w = train_ds.image_size
    img_size = cfg.img_size or max(h, w)
    kwargs = dict(cfg.model_kwargs)
    for key, value in (("img_size", img_size), ("in_chans", train_ds.channels), ("num_classes", train_ds.num_classes)):
        if key in kwargs and kwargs[key] != value:
            where = "img_size" if key == "img_size" else "the dataset"
            raise ValueError(f"model_kwargs.{key}={kwargs[key]!r} disagrees with {where} ({value}); "
                             f"remove it (it is filled from the data){' or set img_size' if key == 'img_size' else ''}")
        kwargs[key] = value
    return dataclasses.replace(cfg, img_size=img_size, model_kwargs=kwargs, workdir=str(workdir))


def _config_differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]


class _Progress:
    """tqdm on a TTY; otherwise about ten plain lines per run (no bar control characters in logs)."""

    def __init__(self, total: int, initial: int, enabled: bool | None, log) -> None:
        self.total, self.log = total, log
        self.tty = logs.is_tty() if enabled is None else enabled
        self.bar = None
        self.every = max(1, total // 10)
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float, ips: float, eta_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}", refresh=False)
            self.bar.refresh()
        elif self.tty is not False and (step % self.every == 0 or step == self.total):
            self.log(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {ips:.0f} img/s  eta {eta_s:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(cfg: TrainConfig, workdir: str | os.PathLike | None = None, resume: bool | None = None,
          progress: bool | None = None, log=print) -> dict:
    """Run `cfg` in `workdir` (default cfg.workdir) and return the summary dict.

    resume: None resumes automatically when the workdir holds a checkpoint; True requires one.
    progress: None shows a tqdm bar on a TTY and sparse lines otherwise; False prints only the
    start and the summary. Raises TrainingDiverged on a NaN/Inf loss (the last good checkpoint
    stays on disk), ValueError/FileNotFoundError/PermissionError on bad input before writing
    anything but the work directory itself, softmoe._lock.WorkdirLocked (a ValueError) if another
    run holds the work directory. torch's thread count is restored afterwards."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as held:  # the work directory's lock, once _train takes it
        try:
            return _train(cfg, workdir, resume, progress, log, held)
        finally:
            torch.set_num_threads(threads)


def _train(cfg: TrainConfig, workdir, resume, progress, log, held: contextlib.ExitStack) -> dict:
    from softmoe.data import TrainBatches, load_dataset
    from softmoe.models import create_model, get_config

    cfg = dataclasses.replace(cfg).validate()
    workdir = Path(workdir or cfg.workdir)
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    # -- data and model (all checks before anything is written) -----------------------------
    kwargs = dict(root=cfg.data_root, download=cfg.download)
    folder_kw = dict(skip_bad=cfg.skip_bad_images, image_size=cfg.data_image_size)
    train_ds = load_dataset(cfg.data, "train", **kwargs, **folder_kw)
    test_ds = load_dataset(cfg.data, cfg.test_split, **kwargs, **folder_kw)
    if cfg.batch_size > len(train_ds):
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {cfg.data!r} train split ({len(train_ds)} "
                         f"images); use batch_size <= {len(train_ds)}")
    if test_ds.classes != train_ds.classes:
        raise ValueError(f"the train and {cfg.test_split} splits of {cfg.data!r} have different classes")
    cfg = resolve_config(cfg, train_ds, workdir)
    resolved = cfg.to_dict()
    get_config(cfg.model, **cfg.model_kwargs)  # unknown model or override: ValueError before any write
    steps_per_epoch = len(train_ds) // cfg.batch_size
    total = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    schedule = make_schedule(cfg, total)  # warmup/cooldown longer than the run: ValueError here
    if resume and ckpt_mod.latest_checkpoint(workdir) is None:
        raise FileNotFoundError(f"--resume: work directory {str(workdir)!r} holds no checkpoint to resume")
    prepare_workdir(workdir)
    held.enter_context(workdir_lock(workdir))  # a second run here: WorkdirLocked (exit 2)

    config_path = workdir / "config.json"
    latest = ckpt_mod.latest_checkpoint(workdir)
    if latest is not None and config_path.is_file():
        diffs = _config_differences(ckpt_mod.read_run_config(config_path), resolved)
        if diffs:
            raise ValueError(f"work directory {str(workdir)!r} holds a checkpoint of a different run "
                             f"({'; '.join(diffs)}); use another --workdir or the same config")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    model = create_model(cfg.model, **cfg.model_kwargs).to(device)
    model.train()
    set_buffer_reuse(model, cfg.reuse_buffers)
    optimizer = build_optimizer(model, cfg)
    train_images = train_ds
    if device.type == "cuda" and train_ds.images.numel() <= GPU_DATASET_BYTES:
        # a small dataset lives on the GPU: a batch is one gather there, no host-to-device copy
        from softmoe.data import ImageDataset

        train_images = ImageDataset(train_ds.images.to(device), train_ds.labels.to(device), train_ds.classes,
                                    train_ds.name, train_ds.split)
    loader = TrainBatches(train_images, cfg.batch_size, cfg.seed, cfg.img_size, cfg.augment,
                          padding=cfg.crop_padding, area_min=cfg.inception_area_min, flip=cfg.flip,
                          device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in model.parameters())

    start = 0
    if latest is not None:
        state = ckpt_mod.load_train_state(latest)
        ckpt_mod.load_model_weights(model, latest)  # dtypes checked per tensor
        optimizer.load_state_dict(state["optimizer"])
        ckpt_mod.set_rng_state(state["rng"])
        start = int(state["step"])
        if start > total:
            raise ValueError(f"checkpoint {str(latest)!r} is at step {start}, past this run's {total} steps")
        log(f"resuming from {latest} (step {start}/{total})")
    logs.truncate_metrics(workdir, start)  # what a killed run logged after its checkpoint (or before its first)
    atomic_write_json(config_path, resolved, sort_keys=True)

    writer = logs.MetricsWriter(workdir, tensorboard=cfg.tensorboard, purge_step=start if start else None,
                                notice=log)
    n_moe = sum(1 for _ in moe_layers(model))
    log(f"training {cfg.model} ({num_params / 1e6:.2f}M params, {n_moe} MoE layers) on {cfg.data} "
        f"({len(train_ds)} train / {len(test_ds)} {cfg.test_split}, {train_ds.channels}x{cfg.img_size}px) "
        f"for {total} steps of {cfg.batch_size} on {device}{' bf16' if use_bf16 else ''}; workdir {workdir}")

    def train_state(step: int) -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "rng": ckpt_mod.rng_state(),
                "data": {"seed": cfg.seed, "step": step, "epoch": step // steps_per_epoch,
                         "steps_per_epoch": steps_per_epoch},
                "train_config": json.dumps(resolved)}

    def save(step: int) -> Path:
        return ckpt_mod.save_checkpoint(workdir, step, model, train_state(step), resolved, keep=cfg.keep_checkpoints)

    bar = _Progress(total, start, progress, log)
    win = {"loss": 0.0, "correct": 0, "n": 0, "data": 0.0, "step": 0.0, "count": 0}
    totals = {"data": 0.0, "step": 0.0, "images": 0, "steps": 0}
    last_eval = None
    last_ckpt_step = start if latest is not None else None
    last_loss = float("nan")
    t_run = time.perf_counter()
    try:
        for s in range(start, total):
            t0 = time.perf_counter()
            x, y = loader.batch(s)  # (B, C, img, img) float32, (B,)
            t1 = time.perf_counter()
            lr = schedule(s)
            set_lr(optimizer, lr)
            routing = cfg.routing_metrics_every and n_moe and ((s + 1) % cfg.routing_metrics_every == 0 or s == 0)
            with (record_routing(model) if routing else contextlib.nullcontext()), autocast():
                logits = model(x)  # (B, num_classes)
            logits = logits.float()
            loss = classification_loss(logits, y, cfg.loss, cfg.label_smoothing)
            aux = collect_aux_loss(model)
            total_loss = loss + cfg.aux_loss_weight * aux if aux is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            loss_value, norm_value = float(total_loss.detach()), float(grad_norm)
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                good = ckpt_mod.latest_checkpoint(workdir)
                writer.write({"kind": "diverged", "step": s + 1, "loss": loss_value, "grad_norm": norm_value, "lr": lr})
                raise TrainingDiverged(
                    f"training diverged at step {s + 1}: the {what} is {loss_value if what == 'loss' else norm_value} "
                    f"(lr {lr:.3g}); stopped without saving. Last good checkpoint: "
                    f"{good if good else 'none (no checkpoint was written yet)'}")
            optimizer.step()
            t2 = time.perf_counter()
            step = s + 1
            last_loss = loss_value
            win["loss"] += loss_value
            win["correct"] += int((logits.detach().argmax(-1) == y).sum())
            win["n"] += len(y)
            win["data"] += t1 - t0
            win["step"] += t2 - t1
            win["count"] += 1
            totals["data"] += t1 - t0
            totals["step"] += t2 - t1
            totals["images"] += len(y)
            totals["steps"] += 1
            if routing:
                writer.write({"kind": "routing", "step": step, **{f"routing/{k}": v for k, v in
                                                                  collect_metrics(model).items()}})
            if step % cfg.log_every == 0 or step == total:
                elapsed = win["data"] + win["step"]
                ips = win["n"] / elapsed if elapsed > 0 else 0.0
                rec = {"kind": "train", "step": step, "epoch": s // steps_per_epoch, "loss": win["loss"] / win["count"],
                       "accuracy": win["correct"] / win["n"], "lr": lr, "grad_norm": norm_value,
                       "images_per_s": ips, "data_ms": 1e3 * win["data"] / win["count"],
                       "step_ms": 1e3 * win["step"] / win["count"]}
                if aux is not None:
                    rec["aux_loss"] = float(aux.detach())
                writer.write(rec)
                per_step = (totals["data"] + totals["step"]) / totals["steps"]
                bar.update(step, rec["loss"], lr, ips, per_step * (total - step))
                win = {"loss": 0.0, "correct": 0, "n": 0, "data": 0.0, "step": 0.0, "count": 0}
            if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                last_eval = {"kind": "eval", "step": step, **evaluate(model, test_ds, cfg.img_size,
                                                                      cfg.eval_batch_size, device, autocast, cfg.loss)}
                writer.write(last_eval)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total:
                save(step)
                last_ckpt_step = step
        bar.close()
        final_ckpt = save(total) if last_ckpt_step != total else ckpt_mod.checkpoint_dir(workdir, total)
        t_eval = time.perf_counter()
        last_eval = {"kind": "eval", "step": total, **evaluate(model, test_ds, cfg.img_size, cfg.eval_batch_size,
                                                               device, autocast, cfg.loss)}
        eval_s = time.perf_counter() - t_eval
        writer.write(last_eval)
    finally:
        bar.close()
        writer.close()
        release_buffers(model)  # what the MoE layers kept between steps

    wall = time.perf_counter() - t_run
    busy = totals["data"] + totals["step"]
    plots = logs.write_plots(workdir, notice=log) if cfg.plots else []
    summary = {
        "model": cfg.model, "params": num_params, "data": cfg.data, "steps": total, "resumed_from": start or None,
        "steps_this_session": totals["steps"],
        "train_loss": last_loss if totals["steps"] else None,  # None, not NaN (invalid JSON), when nothing ran
        "test_accuracy": last_eval["test_accuracy"], "test_loss": last_eval["test_loss"],
        "images_per_s": totals["images"] / busy if busy else None,
        "data_ms_per_step": 1e3 * totals["data"] / totals["steps"] if totals["steps"] else None,
        "step_ms_per_step": 1e3 * totals["step"] / totals["steps"] if totals["steps"] else None,
        "data_time_fraction": totals["data"] / busy if busy else None,
        "eval_s": eval_s, "wall_s": wall, "device": str(device), "bf16": use_bf16,
        "threads": torch.get_num_threads(), "workdir": str(workdir), "checkpoint": str(final_ckpt),
        "plots": [str(p) for p in plots],
    }
    atomic_write_json(workdir / "summary.json", summary, sort_keys=True)
    log(summary_table(summary))
    return summary


def summary_table(s: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [("model", f"{s['model']} ({s['params'] / 1e6:.2f}M params)"), ("data", s["data"]),
            ("steps", f"{s['steps']}" + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else "")),
            ("final train loss", fmt(s["train_loss"], ".4f")),
            ("test accuracy", f"{100 * s['test_accuracy']:.2f}%"), ("test loss", fmt(s["test_loss"], ".4f")),
            ("images/s (train)", fmt(s["images_per_s"], ".0f")),
            ("data / step time", f"{fmt(s['data_ms_per_step'], '.2f')} ms / {fmt(s['step_ms_per_step'], '.2f')} ms "
                                 f"per step ({fmt(100 * s['data_time_fraction'] if s['data_time_fraction'] is not None else None, '.1f')}% data)"),
            ("wall time", f"{s['wall_s']:.1f} s on {s['device']} ({s['threads']} threads)"),
            ("checkpoint", s["checkpoint"]), ("metrics", str(Path(s["workdir"]) / logs.METRICS)),
            ("plots", str(Path(s["workdir"]) / "plots") if s["plots"] else "-")]
    return "summary:\n" + logs.format_table(rows)
