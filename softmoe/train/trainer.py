"""The training loop: `train(cfg)` runs a TrainConfig in a work directory and resumes it exactly.

    _setup_run    data, config checks, model, optimizer, loader; restore the newest checkpoint
    _train_loop   per step: _train_step (forward and backward of each micro-batch, clip, update: no
                  host sync), the
                  running totals (_Tally) and the NaN/Inf watch (_DivergenceGuard) on the device;
                  the host reads them only to write a record (log, routing metrics), evaluate
                  or checkpoint
    _summary      summary.json and the table

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

from softmoe import distributed as smd
from softmoe._device import resolve_device
from softmoe._io import atomic_write_json
from softmoe._lock import workdir_lock
from softmoe._tables import text_table
from softmoe.layers import (collect_aux_loss, collect_metrics, moe_layers, record_routing, release_buffers,
                            set_buffer_reuse)

from . import checkpoint as ckpt_mod
from . import logs
from . import parallel
from .blocks import apply_activation_checkpointing, compile_blocks
from .config import TrainConfig, resumable_fields
from .evaluation import evaluate
from .memory import PeakMemory
from .optim import build_optimizer, make_schedule, set_lr
from .timing import StepClock

GPU_DATASET_BYTES = 4 * 2**30  # uint8 train images up to this size are copied to the GPU once


def _quiet(*args, **kwargs) -> None:
    """The log function of ranks other than 0."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; nothing was saved after the last good step."""

    exit_code = 1  # `softmoe train` / `softmoe demo` exit status (bad input exits 2)


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


def resolve_config(cfg: TrainConfig, train_ds, workdir: Path) -> TrainConfig:
    """The config with everything the data decides filled in (img_size, and the model's
    img_size, in_chans, num_classes), so that config.json alone rebuilds the same run."""
    h, w = train_ds.image_size
    img_size = cfg.img_size or max(h, w)
    overrides = dict(cfg.model.overrides)
    for key, value in (("img_size", img_size), ("in_chans", train_ds.channels), ("num_classes", train_ds.num_classes)):
        if overrides.get(key) is not None and overrides[key] != value:
            where = "img_size" if key == "img_size" else "the dataset"
            raise ValueError(f"model.{key}={overrides[key]!r} disagrees with {where} ({value}); "
                             f"remove it (it is filled from the data){' or set img_size' if key == 'img_size' else ''}")
        overrides[key] = value
    model = dataclasses.replace(cfg.model, overrides=overrides)
    return dataclasses.replace(cfg, img_size=img_size, model=model, workdir=str(workdir))


def _config_differences(saved: dict, new: dict) -> list[str]:
    """"key: old -> new" for every non-resumable field in which two config dicts differ; the
    saved one may be in the old format (migrated first)."""
    try:
        old = TrainConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError) as e:
        raise ValueError(f"the saved config.json is not a valid training config ({e})") from e
    keys = sorted(set(old) | set(new))
    resumable = resumable_fields()
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if k not in resumable and old.get(k) != new.get(k)]


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
    run holds the work directory. torch's thread count is restored afterwards, and a process
    group this run created (under torchrun) is destroyed, on success or error."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.task == "lm":  # char-level language modelling: its own loop (softmoe/lm/train.py)
        from softmoe.lm.train import train_lm

        return train_lm(cfg, workdir, log, resume=resume)
    threads = torch.get_num_threads()
    had_group = parallel.has_process_group()
    finished = False
    with contextlib.ExitStack() as held:  # the work directory's lock, once _setup_run takes it
        try:
            summary = _train(cfg, workdir, resume, progress, log, held)
            finished = True
            return summary
        finally:
            torch.set_num_threads(threads)
            if not had_group:
                parallel.close_process_group(finished)


def _train(cfg: TrainConfig, workdir, resume, progress, log, held: contextlib.ExitStack) -> dict:
    memory = PeakMemory(resolve_device(cfg.device))  # before the data and the model exist
    run = _setup_run(cfg, workdir, resume, log, held)
    t_run = time.perf_counter()
    if not run.is_main:
        log, progress = _quiet, False
    writer = logs.MetricsWriter(run.workdir, tensorboard=run.cfg.tensorboard,
                                purge_step=run.start if run.start else None, notice=log) \
        if run.is_main else parallel.NullWriter()
    bar = _Progress(run.total, run.start, progress, log)
    try:
        tally = _train_loop(run, writer, bar)
        bar.close()
        final_ckpt = run.save(run.total) if run.last_ckpt_step != run.total else \
            ckpt_mod.checkpoint_dir(run.workdir, run.total)
        t_eval = time.perf_counter()
        last_eval = run.evaluate(run.total, final=True)  # overlaps a checkpoint_async save
        eval_s = time.perf_counter() - t_eval
        writer.write(last_eval)
        run.finish_save()
    except BaseException:
        run.abandon_save()  # before the process groups go (the background save uses one)
        raise
    finally:
        bar.close()
        writer.close()
        release_buffers(run.model)  # what the MoE layers kept between steps
    summary = _summary(run, tally, last_eval, final_ckpt, eval_s, time.perf_counter() - t_run, log)
    summary.update(_memory_summary(run, memory.read()))
    if run.is_main:
        atomic_write_json(run.workdir / "summary.json", summary, sort_keys=True)
    log(summary_table(summary))
    return summary


# -- setup ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    """A run ready to train: what `_setup_run` built, read by the loop and the summary."""
    cfg: TrainConfig  # resolved: img_size and the model's data-dependent fields filled in
    workdir: Path
    device: torch.device
    use_bf16: bool
    train_ds: object
    test_ds: object
    val_ds: object  # held out of train (cfg.val_split), or None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: object  # softmoe.data.TrainBatches
    schedule: object  # step -> learning rate
    total: int  # steps of the whole run
    steps_per_epoch: int
    start: int = 0  # first step of this session (the checkpoint's step when resuming)
    last_ckpt_step: int | None = None  # the step of the newest checkpoint on disk
    params: list = dataclasses.field(default_factory=list)  # what the gradient is clipped over
    moe: list = dataclasses.field(default_factory=list)  # the model's MoE layers
    mesh: object = None  # softmoe.distributed.Mesh under torchrun (world > 1), else None
    ddp: object = None  # the DDP module forward runs through (data_parallel "ddp"), else None
    micro_batches: int = 1  # k: each rank's rows run as k micro-batches (cfg.micro_batch_size)
    pending: object = None  # the parallel.PendingSave of a checkpoint_async save in flight, or None

    @property
    def is_main(self) -> bool:
        """Rank 0, or a single process: the one that prints, logs and writes shared files."""
        return self.mesh is None or self.mesh.rank == 0

    @property
    def resolved(self) -> dict:
        return self.cfg.to_dict()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def evaluate(self, step: int, final: bool = False) -> dict:
        """The "eval" record of `step`: accuracy and loss on the validation split when there is
        one (val_*), else on the test set; the final one (`final`) scores the test set as well;
        the MoE layers' routing diagnostics (router/<layer>/<metric>) on 256 of those images."""
        def score(ds):
            return evaluate(self.model, ds, self.cfg.img_size, self.cfg.eval_batch_size, self.device, self.autocast,
                            self.cfg.loss, mesh=self.mesh)  # under torchrun: sharded over the ranks

        rec = {"kind": "eval", "step": step}
        if self.moe and self.mesh is None:  # routing diagnostics over time (softmoe.eval.routing)
            from softmoe.eval.routing import router_record

            rec.update(router_record(self.model, self.val_ds if self.val_ds is not None else self.test_ds,
                                     self.cfg.img_size, self.device))
        if self.val_ds is not None:
            rec.update({k.replace("test_", "val_"): v for k, v in score(self.val_ds).items()})
            if not final:
                return rec
        return {**rec, **score(self.test_ds)}

    def save(self, step: int) -> Path:
        """Checkpoint `step`: weights, optimizer, RNG states and the data position. Under
        torchrun with checkpoint_async the shards are written in the background: the previous
        such save is finished first (`finish_save`), this one by the next save or the run's end."""
        self.finish_save()
        state = {"step": step, "optimizer": self.optimizer.state_dict(), "rng": ckpt_mod.rng_state(),
                 "data": {"seed": self.cfg.seed, "step": step, "epoch": step // self.steps_per_epoch,
                          "steps_per_epoch": self.steps_per_epoch},
                 "train_config": json.dumps(self.resolved)}
        if self.mesh is not None:
            del state["optimizer"]  # in the DCP shards with the weights
            path = parallel.save_parallel(ckpt_mod.checkpoint_dir(self.workdir, step), self.model, self.optimizer,
                                          state, self.resolved, self.cfg.keep_checkpoints, self.mesh,
                                          async_save=self.cfg.checkpoint_async)
            if isinstance(path, parallel.PendingSave):
                self.pending, path = path, path.path
        else:
            path = ckpt_mod.save_checkpoint(self.workdir, step, self.model, state, self.resolved,
                                            keep=self.cfg.keep_checkpoints)
        self.last_ckpt_step = step
        return path

    def finish_save(self) -> None:
        """Finish the checkpoint_async save in flight, if any (collective): wait for its shards,
        then its COMPLETE marker, rank 0's files and the rename to step_N."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()

    def abandon_save(self) -> None:
        """On an error exit: let the save in flight end without finishing it (no rename: the
        previous complete checkpoint stays the newest); its .tmp-* directory is removed by the
        next run's first save."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.abandon()


def _setup_run(cfg: TrainConfig, workdir, resume: bool | None, log, held: contextlib.ExitStack) -> _Run:
    """Data, config checks, model, optimizer and loader, restored from the newest checkpoint
    of `workdir` when there is one. Every check runs before anything but the work directory
    itself is written; then the resolved config.json is written."""
    from softmoe.data import load_dataset

    cfg = dataclasses.replace(cfg).validate()
    workdir = Path(workdir or cfg.workdir)
    mesh = parallel.setup_parallel(cfg.ep_size, cfg.batch_size, cfg.dist_timeout_s, cfg.checkpoint_timeout_s,
                                   cfg.micro_batch_size, cfg.dp_replicate)
    k = parallel.micro_batches(cfg.micro_batch_size, cfg.batch_size, 1 if mesh is None else mesh.world_size)
    if mesh is not None and mesh.rank != 0:
        log = _quiet
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    data_kw = dict(root=cfg.data_root, download=cfg.download, skip_bad=cfg.skip_bad_images,
                   image_size=cfg.data_image_size)
    train_ds = load_dataset(cfg.data, "train", **data_kw)
    test_ds = load_dataset(cfg.data, cfg.test_split, **data_kw)
    val_ds = None
    if cfg.val_split:
        from softmoe.data import split_train_val

        train_ds, val_ds = split_train_val(train_ds, cfg.val_split)
    if cfg.batch_size > len(train_ds):
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the {cfg.data!r} train split ({len(train_ds)} "
                         f"images); use batch_size <= {len(train_ds)}")
    if test_ds.classes != train_ds.classes:
        raise ValueError(f"the train and {cfg.test_split} splits of {cfg.data!r} have different classes")
    cfg = resolve_config(cfg, train_ds, workdir)
    cfg.model.vit_config()  # unknown model or override: ValueError before any write
    steps_per_epoch = len(train_ds) // cfg.batch_size
    total = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    schedule = make_schedule(cfg, total)  # warmup/cooldown longer than the run: ValueError here
    if resume and ckpt_mod.latest_checkpoint(workdir) is None:
        raise FileNotFoundError(f"--resume: work directory {str(workdir)!r} holds no checkpoint to resume")
    prepare_workdir(workdir)
    _lock_workdir(workdir, mesh, held)
    latest = _checkpoint_to_resume(workdir, cfg)

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    with torch.device("meta"):  # no rank (nor a single process) ever holds more than its own shards
        model = cfg.model.build()
    _check_micro_batch(model, cfg.batch_size // k // (1 if mesh is None else mesh.world_size), k)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)  # from outside, before FSDP (blocks.py)
    if cfg.compile:
        compile_blocks(model)
    if mesh is not None:  # experts as DTensors over "ep", then FSDP2 (or DDP below); still on meta
        parallel.parallelize(model, mesh, cfg.data_parallel)
    smd.materialize(model, device, cfg.seed)  # local shards only; keyed init: the same numbers at every layout
    if mesh is not None or k > 1 or cfg.compile:  # router noise: one process's draw for each (micro-)batch's rows,
        # eager under torch.compile (inductor's RNG would draw other numbers than eager torch.randn)
        rows = parallel.rows(mesh, cfg.batch_size) or (0, cfg.batch_size)
        smd.key_noise_by_global_rows(model, rows, cfg.batch_size, micro_batches=k)
    model.train()
    set_buffer_reuse(model, cfg.reuse_buffers)
    ddp = parallel.ddp_wrapper(model, cfg.data_parallel) if mesh is not None else None
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"
    run = _Run(cfg=cfg, workdir=workdir, device=device, use_bf16=use_bf16, train_ds=train_ds, test_ds=test_ds,
               val_ds=val_ds, model=model, optimizer=build_optimizer(model, cfg),
               loader=_train_batches(cfg, train_ds, device), schedule=schedule, total=total,
               steps_per_epoch=steps_per_epoch, params=[p for p in model.parameters() if p.requires_grad],
               moe=[m for _, m in moe_layers(model)], mesh=mesh, ddp=ddp, micro_batches=k)
    if latest is not None:
        _restore(run, latest, log)
    if run.is_main:
        logs.truncate_metrics(workdir, run.start)  # what a killed run logged after its checkpoint (or before its first)
        atomic_write_json(workdir / "config.json", run.resolved, sort_keys=True)
    num_params = parallel.num_params(model)
    log(f"training {cfg.model.name} ({num_params / 1e6:.2f}M params, {len(run.moe)} MoE layers) on {cfg.data} "
        f"({len(train_ds)} train / {f'{len(val_ds)} val / ' if val_ds is not None else ''}"
        f"{len(test_ds)} {cfg.test_split}, {train_ds.channels}x{cfg.img_size}px) "
        f"for {total} steps of {cfg.batch_size}{f' in {k} micro-batches' if k > 1 else ''} on {device}"
        f"{' bf16' if run.use_bf16 else ''}; workdir {workdir}")
    if cfg.checkpoint_async and mesh is None:
        log("checkpoint_async applies to torchrun runs (DCP shards written in the background); this single-process "
            "run writes its checkpoints synchronously (docs/distributed.md)")
    return run


def _check_micro_batch(model: nn.Module, micro_rows: int, k: int) -> None:
    """With accumulation (k > 1), every Tokens/Experts Choice layer's group_size must divide the
    micro-batch: its routing groups (capacity, aux loss) are then those of one process without
    accumulation. ValueError naming micro_batch_size and the layer."""
    if k == 1:
        return
    for name, layer in moe_layers(model):
        G = getattr(layer, "group_size", 1)
        if micro_rows % G:
            raise ValueError(f"micro_batch_size={micro_rows} must be a multiple of {name}'s group_size={G}: a routing "
                             f"group of {G} sequences must not straddle two micro-batches")


def _lock_workdir(workdir: Path, mesh, held: contextlib.ExitStack) -> None:
    """Hold the work directory for this run (a second run here: WorkdirLocked, exit 2). Under
    torchrun rank 0 holds it for all ranks, and every rank learns whether it got it, so that
    all of them stop at once instead of waiting on a collective that rank 0 never joins."""
    if mesh is None:
        held.enter_context(workdir_lock(workdir))
        return
    error = None
    if mesh.rank == 0:
        try:
            held.enter_context(workdir_lock(workdir))
        except ValueError as e:
            error = e
    if not parallel.all_ranks_agree(error is None):
        raise error or ValueError(f"work directory {str(workdir)!r} is held by another run (rank 0 could not lock "
                                  f"it; see rank 0's message)")


def _checkpoint_to_resume(workdir: Path, cfg: TrainConfig) -> Path | None:
    """The newest checkpoint of `workdir` (None: start afresh); ValueError if it belongs to
    a run whose non-resumable fields differ from `cfg`."""
    latest = ckpt_mod.latest_checkpoint(workdir)
    config_path = workdir / "config.json"
    if latest is not None and config_path.is_file():
        diffs = _config_differences(ckpt_mod.read_run_config(config_path), cfg.to_dict())
        if diffs:
            raise ValueError(f"work directory {str(workdir)!r} holds a checkpoint of a different run "
                             f"({'; '.join(diffs)}); use another --workdir or the same config")
    return latest


def _train_batches(cfg: TrainConfig, train_ds, device: torch.device):
    """The seeded, step-indexed training batches. A small dataset is copied to the GPU once,
    so that a batch is one gather there, with no host-to-device copy."""
    from softmoe.data import ImageDataset, TrainBatches

    if device.type == "cuda" and train_ds.images.numel() <= GPU_DATASET_BYTES:
        train_ds = ImageDataset(train_ds.images.to(device), train_ds.labels.to(device), train_ds.classes,
                                train_ds.name, train_ds.split)
    return TrainBatches(train_ds, cfg.batch_size, cfg.seed, cfg.img_size, cfg.augment, padding=cfg.crop_padding,
                        area_min=cfg.inception_area_min, flip=cfg.flip, device=device)


def _restore(run: _Run, checkpoint: Path, log) -> None:
    """Weights, optimizer state, RNG states and the step of `checkpoint`; the metrics logged
    after it are dropped (this session writes them again)."""
    state = ckpt_mod.load_train_state(checkpoint)
    if run.mesh is not None or "optimizer" not in state:  # a parallel run, or a parallel run's checkpoint
        parallel.load_any(checkpoint, run.model, run.optimizer, state, run.mesh)
    else:
        ckpt_mod.load_model_weights(run.model, checkpoint)  # dtypes checked per tensor
        run.optimizer.load_state_dict(state["optimizer"])
    ckpt_mod.set_rng_state(parallel.rng_to_restore(checkpoint, state, run.mesh, log))  # this rank's
    run.start = run.last_ckpt_step = int(state["step"])
    if run.start > run.total:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is at step {run.start}, past this run's {run.total} steps")
    log(f"resuming from {checkpoint} (step {run.start}/{run.total})")


# -- one step -----------------------------------------------------------------------------------
@dataclasses.dataclass
class _StepResult:
    """What one optimisation step leaves on the device (nothing here has been synced)."""
    loss: torch.Tensor  # () float32: classification + aux_loss_weight * aux
    grad_norm: torch.Tensor  # () global gradient norm before clipping
    correct: torch.Tensor  # () int64: right predictions in the batch
    images: int
    aux: torch.Tensor | None  # () the MoE auxiliary loss, None when no layer has one


def _train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float, routing: bool) -> _StepResult:
    """Forward, backward, clipping and the optimizer update on the batch x (B, C, img, img),
    y (B,), at learning rate `lr`, without a host sync. With gradient accumulation
    (run.micro_batches = k > 1) the batch runs as k consecutive micro-batches of B/k rows whose
    losses, each divided by k, add up to the gradient of the whole batch's loss (every term is
    a mean over rows or routing groups: docs/distributed.md); the gradients are reduced over the
    ranks once, in the last micro-batch's backward; one clip and update. The result holds the
    whole batch's values (loss and aux: the mean over micro-batches; correct: the sum); routing
    metrics are the last micro-batch's."""
    cfg, model, optimizer, k = run.cfg, run.model, run.optimizer, run.micro_batches
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    m = len(y) // k
    parts = []
    for i in range(k):
        if k > 1:
            smd.select_micro_batch(model, i)  # router noise: this micro-batch's rows of the step's draw
        with parallel.gradient_sync(run, enabled=i == k - 1):
            parts.append(_forward_backward(run, x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], k,
                                           routing and i == k - 1))
    loss, correct, aux = parts[0] if k == 1 else _combine(parts)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    if run.mesh is not None:
        return parallel.finish_step(run, loss, correct, len(y), aux, max_norm, _StepResult)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, max_norm)
    optimizer.step()
    return _StepResult(loss, grad_norm.detach(), correct, len(y), aux)


def _forward_backward(run: _Run, x: torch.Tensor, y: torch.Tensor, k: int, routing: bool):
    """One micro-batch x (m, C, img, img), y (m,): forward, the loss (classification mean over
    the m rows + aux_loss_weight * aux), backward of loss / k (gradients accumulate). Returns
    the detached (loss, correct predictions, aux or None) of the micro-batch."""
    cfg, model = run.cfg, run.model
    with (record_routing(model) if routing else contextlib.nullcontext()), run.autocast():
        logits = (run.ddp or model)(x)  # (m, num_classes)
    logits = logits.float()
    loss = classification_loss(logits, y, cfg.loss, cfg.label_smoothing)
    # Logged only for layers that have one (Soft MoE and Experts Choice have none; then
    # collect_aux_loss would be a constant zero).
    aux = collect_aux_loss(model) if any(m.aux_loss is not None for m in run.moe) else None
    if aux is not None:
        loss = loss + cfg.aux_loss_weight * aux
    (loss if k == 1 else loss / k).backward()
    correct = (logits.detach().argmax(-1) == y).sum()
    return loss.detach(), correct, None if aux is None else aux.detach()


def _combine(parts: list[tuple]) -> tuple:
    """The whole batch's (loss, correct, aux) of k equal micro-batches' values: the mean of the
    losses and aux losses (each a mean over its micro-batch's rows or groups), the sum of correct."""
    losses, corrects, auxes = zip(*parts)
    aux = None if auxes[0] is None else torch.stack(auxes).mean()
    return torch.stack(losses).mean(), torch.stack(corrects).sum(), aux


# -- the loop -----------------------------------------------------------------------------------
class _Tally:
    """Running totals: those of the current log window (loss and correct predictions on the
    device; the loss sum in float64, so it equals a host-side sum of the per-step floats) and
    the whole session's times and counts (host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.data_s = self.step_s = 0.0  # the session
        self.images = self.steps = 0
        self.last: _StepResult | None = None
        self.reset_window()

    def reset_window(self) -> None:
        self.win_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.win_correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self.win_images = self.win_steps = 0
        self.win_data_s = self.win_step_s = 0.0

    def add(self, out: _StepResult) -> None:
        self.win_loss += out.loss
        self.win_correct += out.correct
        self.win_images += out.images
        self.win_steps += 1
        self.images += out.images
        self.steps += 1
        self.last = out

    def add_times(self, data_s: float, step_s: float) -> None:
        """Seconds of data and compute work of steps already counted by `add` (StepClock.collect)."""
        self.win_data_s += data_s
        self.win_step_s += step_s
        self.data_s += data_s
        self.step_s += step_s

    def train_record(self, step: int, epoch: int, lr: float) -> dict:
        """The "train" record of the window ending at `step` (syncs with the device)."""
        w = self.win_steps
        elapsed = self.win_data_s + self.win_step_s
        rec = {"kind": "train", "step": step, "epoch": epoch, "loss": float(self.win_loss) / w,
               "accuracy": int(self.win_correct) / self.win_images, "lr": lr, "grad_norm": float(self.last.grad_norm),
               "images_per_s": self.win_images / elapsed if elapsed > 0 else 0.0,
               "data_ms": 1e3 * self.win_data_s / w, "step_ms": 1e3 * self.win_step_s / w}
        if self.last.aux is not None:
            rec["aux_loss"] = float(self.last.aux)
        return rec


class _DivergenceGuard:
    """Finds the first step whose loss or gradient norm is NaN/Inf without a host sync per step:
    the first such (step, loss, grad_norm) is kept on the device, and `check` (called before
    anything is logged, evaluated or saved) reads it and raises TrainingDiverged. The steps
    after it are wasted, never recorded: the newest checkpoint stays the last good state."""

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(3, dtype=torch.float64, device=device)  # (step, loss, grad_norm); step 0: none

    def update(self, step: int, out: _StepResult) -> None:
        values = torch.stack([out.loss.double(), out.grad_norm.double()])  # (2,)
        new = torch.isfinite(values).all().logical_not() & (self.first[0] == 0)
        self.first = torch.where(new, torch.cat([values.new_full((1,), step), values]), self.first)

    def check(self, run: _Run, writer) -> None:
        step, loss, norm = self.first.tolist()
        if step == 0:
            return
        step = int(step)
        lr = run.schedule(step - 1)
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        run.finish_save()  # a save in flight is of a good step (checked before it); every rank is here
        good = ckpt_mod.latest_checkpoint(run.workdir)
        writer.write({"kind": "diverged", "step": step, "loss": loss, "grad_norm": norm, "lr": lr})
        raise TrainingDiverged(f"training diverged at step {step}: the {what} is {value} (lr {lr:.3g}); stopped "
                               f"without saving. Last good checkpoint: "
                               f"{good if good else 'none (no checkpoint was written yet)'}")


def _train_loop(run: _Run, writer, bar) -> _Tally:
    """Steps run.start..run.total, with the logging, evaluation and checkpoints of the config.
    The host reads device values only when it writes a record or a checkpoint."""
    cfg, total = run.cfg, run.total
    tally, guard, clock = _Tally(run.device), _DivergenceGuard(run.device), StepClock(run.device)
    for s in range(run.start, total):
        step = s + 1
        clock.start()
        # (b, C, img, img) float32, (b,): this rank's rows of the global batch (b = B / world),
        # the only ones it gathers and augments
        x, y = run.loader.batch(s, parallel.rows(run.mesh, cfg.batch_size))
        clock.data_done()
        lr = run.schedule(s)
        routing = bool(cfg.routing_metrics_every and run.moe and (step % cfg.routing_metrics_every == 0 or s == 0))
        out = _train_step(run, x, y, lr, routing)
        guard.update(step, out)
        clock.step_done()
        tally.add(out)
        log_now = step % cfg.log_every == 0 or step == total
        eval_now = cfg.eval_every and step % cfg.eval_every == 0 and step != total
        save_now = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step != total
        if routing or log_now or eval_now or save_now or step == total:
            guard.check(run, writer)  # the host's one sync: the device has finished the queued steps
            tally.add_times(*clock.collect()[:2])
        if routing:
            writer.write({"kind": "routing", "step": step,
                          **{f"routing/{k}": v for k, v in collect_metrics(run.model).items()}})
        if log_now:
            rec = tally.train_record(step, s // run.steps_per_epoch, lr)
            writer.write(rec)
            per_step = (tally.data_s + tally.step_s) / tally.steps
            bar.update(step, rec["loss"], lr, rec["images_per_s"], per_step * (total - step))
            tally.reset_window()
        if eval_now:
            writer.write(run.evaluate(step))
        if save_now:
            run.save(step)
    return tally


# -- the summary --------------------------------------------------------------------------------
def _summary(run: _Run, tally: _Tally, last_eval: dict, checkpoint: Path, eval_s: float, wall_s: float,
             log) -> dict:
    cfg = run.cfg
    busy = tally.data_s + tally.step_s
    n = tally.steps
    plots = logs.write_plots(run.workdir, notice=log) if cfg.plots and run.is_main else []
    return {
        "model": cfg.model.name, "params": parallel.num_params(run.model), "data": cfg.data,
        "steps": run.total, "resumed_from": run.start or None, "steps_this_session": n,
        "train_loss": float(tally.last.loss) if n else None,  # None, not NaN (invalid JSON), when nothing ran
        "test_accuracy": last_eval["test_accuracy"], "test_loss": last_eval["test_loss"],
        "val_accuracy": last_eval.get("val_accuracy"), "val_loss": last_eval.get("val_loss"),  # None: no val split
        "images_per_s": tally.images / busy if busy else None,
        "data_ms_per_step": 1e3 * tally.data_s / n if n else None,
        "step_ms_per_step": 1e3 * tally.step_s / n if n else None,
        "data_time_fraction": tally.data_s / busy if busy else None,
        "eval_s": eval_s, "wall_s": wall_s, "device": str(run.device), "bf16": run.use_bf16,
        "threads": torch.get_num_threads(), "workdir": str(run.workdir), "checkpoint": str(checkpoint),
        "plots": [str(p) for p in plots],
    }


def _memory_summary(run: _Run, mine: dict) -> dict:
    """This rank's peak memory, and under torchrun every rank's (an all-gather of a few floats
    at the end of the run; every rank calls it)."""
    out = {"memory_kind": mine["kind"], "memory_start_mb": mine["start_mb"], "peak_memory_mb": mine["peak_mb"]}
    if run.mesh is not None:
        ranks = [None] * run.mesh.world_size
        torch.distributed.all_gather_object(ranks, (mine["start_mb"], mine["peak_mb"]))
        out["memory_start_mb_per_rank"] = [s for s, _ in ranks]
        out["peak_memory_mb_per_rank"] = [p for _, p in ranks]
    return out


def _memory_line(s: dict) -> str:
    line = f"{s['peak_memory_mb']:.0f} MB {s['memory_kind']} (run start {s['memory_start_mb']:.0f} MB)"
    if s.get("peak_memory_mb_per_rank"):
        line += "; per rank " + " / ".join(f"{p:.0f}" for p in s["peak_memory_mb_per_rank"]) + " MB"
    return line


def summary_table(s: dict) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    data_pct = 100 * s["data_time_fraction"] if s["data_time_fraction"] is not None else None
    rows = [("model", f"{s['model']} ({s['params'] / 1e6:.2f}M params)"), ("data", s["data"]),
            ("steps", f"{s['steps']}" + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else "")),
            ("final train loss", fmt(s["train_loss"], ".4f")),
            *([("val accuracy", f"{100 * s['val_accuracy']:.2f}%")] if s.get("val_accuracy") is not None else []),
            ("test accuracy", f"{100 * s['test_accuracy']:.2f}%"), ("test loss", fmt(s["test_loss"], ".4f")),
            ("images/s (train)", fmt(s["images_per_s"], ".0f")),
            ("data / step time", f"{fmt(s['data_ms_per_step'], '.2f')} ms / {fmt(s['step_ms_per_step'], '.2f')} ms "
                                 f"per step ({fmt(data_pct, '.1f')}% data)"),
            ("wall time", f"{s['wall_s']:.1f} s on {s['device']} ({s['threads']} threads)"),
            *([("peak memory", _memory_line(s))] if s.get("peak_memory_mb") is not None else []),
            ("checkpoint", s["checkpoint"]), ("metrics", str(Path(s["workdir"]) / logs.METRICS)),
            ("plots", str(Path(s["workdir"]) / "plots") if s["plots"] else "-")]
    return "summary:\n" + text_table(rows, align="<")
