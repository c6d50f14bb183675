"""The char-LM training loop behind `softmoe train` for a config with `task="lm"`.

It reads the generic TrainConfig fields (steps, batch_size, lr, betas, eps, weight_decay,
grad_clip, schedule "cosine"/"constant" with warmup_steps and min_lr, seed, num_threads,
log_every, eval_every, eval_batch_size, checkpoint_every, keep_checkpoints, workdir); `model`
names a decoder of softmoe/models/gpt.py with its GPTConfig overrides; `data` is the corpus
("pydoc" or a path). It trains in one process (under torchrun it is an error), and the
vision trainer's options it would ignore (micro_batch_size, activation_checkpoint, compile,
checkpoint_async, ep_size, dp_replicate) must stay unset (TrainConfig.validate).

Splits (softmoe/lm/data.py): the corpus's last VAL_FRACTION is held out, its first half the
validation split (evaluations during training: decisions), its second half the test split
(scored once, at the end). The final evaluation scores every non-overlapping window of both,
teacher-forced, and PREFIX_WINDOWS of them prefix-only; the per-window values are kept in
the summary (the paired statistics of `softmoe compare --task lm`).

Work directory: config.json (the run's TrainConfig), checkpoints/step_*/ (a save_pretrained
directory + train_config.json + train_state.pt with the step, optimizer state, the data
generator's and the global RNG states, the evaluation history), model/ (the final model) and
metrics.json, each written atomically. A work directory that holds a checkpoint is resumed
from it, bit-exactly: the resumed run ends with the uninterrupted run's weights.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from softmoe._io import atomic_write_json
from softmoe.models.gpt import create_decoder, load_weights, save_pretrained

from .bpc import window_bits_prefix_only, window_bits_teacher_forced
from .data import SPLITS, CharCorpus

VAL_FRACTION = 0.1  # the corpus's last 10% is held out: validation then test, half each
EVAL_WINDOWS = 64  # validation windows for the evaluations during training (teacher-forced)
PREFIX_WINDOWS = 16  # per split at the end: prefix-only costs T forwards per window, so a spread subset


def lr_at(cfg, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant' for task='lm', got {cfg.schedule!r}")
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay on matrices (dense and expert kernels); none on biases, norms, embeddings, phi."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or name.endswith(("tok_emb.weight", "pos_emb", "router.phi"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def spread(n: int, k: int) -> torch.Tensor:
    """min(n, k) indices evenly spread over range(n) (always the same ones)."""
    return torch.linspace(0, n - 1, min(n, k)).round().to(torch.int64)


def evaluate_split(model, corpus: CharCorpus, split: str, block_size: int, batch_size: int,
                   prefix_windows: int = PREFIX_WINDOWS) -> dict:
    """Every non-overlapping window of `split`, teacher-forced, and `prefix_windows` of them
    (evenly spread) prefix-only: the means, the leak gap on the shared windows, and the
    per-window bits (lists of floats, windows in corpus order)."""
    was_training = model.training
    model.eval()
    try:
        windows = corpus.windows(split, block_size)
        tf = window_bits_teacher_forced(model, windows, batch_size)  # (W,)
        idx = spread(len(windows), prefix_windows)
        po = window_bits_prefix_only(model, windows[idx], batch_size)  # (k,)
    finally:
        model.train(was_training)
    tf_shared = tf[idx]
    return {"bpc_teacher_forced": float(tf.mean()), "bpc_prefix_only": float(po.mean()),
            "bpc_teacher_forced_prefix_windows": float(tf_shared.mean()),
            # the leak: prefix-only minus teacher-forced on the same windows (0 for a causal model)
            "leak_gap_bpc": float((po - tf_shared).mean()),
            "windows": len(windows), "characters": len(windows) * block_size, "prefix_windows": idx.tolist(),
            "window_bits_teacher_forced": tf.tolist(), "window_bits_prefix_only": po.tolist()}


def evaluate_val(model, corpus: CharCorpus, block_size: int, batch_size: int) -> dict:
    """The cheap evaluation during training: teacher-forced bpc on EVAL_WINDOWS validation windows."""
    was_training = model.training
    model.eval()
    try:
        bits = window_bits_teacher_forced(model, corpus.windows("val", block_size, EVAL_WINDOWS), batch_size)
    finally:
        model.train(was_training)
    return {"val_bpc_teacher_forced": float(bits.mean())}


def _restore(workdir: Path, cfg, model, opt, gen, log) -> tuple[int, float, list]:
    """(start step, training seconds so far, evaluation history) from the newest checkpoint of
    `workdir`, its weights, optimizer and RNG states loaded; (0, 0.0, []) when there is none."""
    from softmoe.train import checkpoint as ckpt_mod
    from softmoe.train.trainer import _config_differences

    latest = ckpt_mod.latest_checkpoint(workdir)
    if latest is None:
        return 0, 0.0, []
    config_path = workdir / "config.json"
    if config_path.is_file():
        diffs = _config_differences(ckpt_mod.read_run_config(config_path), cfg.to_dict())
        if diffs:
            raise ValueError(f"work directory {str(workdir)!r} holds a checkpoint of a different run "
                             f"({'; '.join(diffs)}); use another --workdir or the same config")
    state = ckpt_mod.load_train_state(latest)
    load_weights(model, latest)
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["data_generator"])
    ckpt_mod.set_rng_state(state["rng"])
    start = int(state["step"])
    if start > cfg.steps:
        raise ValueError(f"checkpoint {str(latest)!r} is at step {start}, past this run's {cfg.steps} steps")
    log(f"resuming from {latest} (step {start}/{cfg.steps})")
    return start, float(state["train_s"]), list(state["history"])


def train_lm(cfg, workdir=None, log=print, resume: bool | None = None) -> dict:
    """Train (or resume) the char LM of `cfg` in `workdir` (default cfg.workdir); returns the
    summary also written to metrics.json. resume: None resumes when the work directory holds a
    checkpoint, True requires one."""
    from softmoe._lock import workdir_lock
    from softmoe.train import checkpoint as ckpt_mod
    from softmoe.train.trainer import prepare_workdir

    if cfg.steps < 1:
        raise ValueError(f"task='lm' trains for steps >= 1 (epochs are not used), got steps={cfg.steps}")
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":  # every rank would train the same model into the same work directory
        raise ValueError(f"task='lm' trains in one process; run `softmoe train` without torchrun "
                         f"(WORLD_SIZE={world})")
    cfg = cfg.validate()
    workdir = Path(workdir or cfg.workdir)
    if resume and ckpt_mod.latest_checkpoint(workdir) is None:
        raise FileNotFoundError(f"--resume: work directory {str(workdir)!r} holds no checkpoint to resume")
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        with contextlib.ExitStack() as held:
            torch.manual_seed(cfg.seed)
            model = create_decoder(cfg.model.name, **cfg.model.overrides)
            T = model.config.block_size
            corpus = CharCorpus.from_spec(cfg.data, VAL_FRACTION, T)
            lr_at(cfg, cfg.steps - 1)  # a bad schedule: ValueError before anything is written
            opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                    betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
            gen = torch.Generator().manual_seed(cfg.seed)
            prepare_workdir(workdir)
            held.enter_context(workdir_lock(workdir))
            start, train_s, history = _restore(workdir, cfg, model, opt, gen, log)
            atomic_write_json(workdir / "config.json", cfg.to_dict(), sort_keys=True)
            log(f"softmoe train (lm): {cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} params, "
                f"corpus {cfg.data!r}: {len(corpus.train):,} train / {len(corpus.val):,} validation / "
                f"{len(corpus.test):,} test bytes; {cfg.steps} steps of {cfg.batch_size}x{T} tokens")
            model.train()
            for step in range(start, cfg.steps):
                x, y = corpus.batch(cfg.batch_size, T, gen)
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                train_s += time.perf_counter() - t0
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    history.append({"step": done, **evaluate_val(model, corpus, T, cfg.eval_batch_size)})
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    state = {"step": done, "optimizer": opt.state_dict(), "data_generator": gen.get_state(),
                             "rng": ckpt_mod.rng_state(), "train_s": train_s, "history": history}
                    ckpt_mod.save_checkpoint(workdir, done, model, state, cfg.to_dict(), keep=cfg.keep_checkpoints)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    log(f"step {done}/{cfg.steps} loss {loss.item():.4f} ({loss.item() / math.log(2):.3f} bpc)")
            final = {s: evaluate_split(model, corpus, s, T, cfg.eval_batch_size) for s in SPLITS}
            test = final["test"]
            summary = {"model": cfg.model.name, "steps": cfg.steps,
                       # the test split, scored once (top level, as before the validation split existed)
                       **{k: test[k] for k in ("bpc_teacher_forced", "bpc_prefix_only",
                                               "bpc_teacher_forced_prefix_windows", "leak_gap_bpc")},
                       **{f"val_{k}": final["val"][k] for k in ("bpc_teacher_forced", "bpc_prefix_only",
                                                                "leak_gap_bpc")},
                       # training steps only (forward, backward, optimizer; no data, no evaluation)
                       "train_tokens_per_s": cfg.steps * cfg.batch_size * T / max(train_s, 1e-9),
                       "train_s": train_s, "resumed_from": start or None,
                       "params": sum(p.numel() for p in model.parameters()), "history": history,
                       "eval": final}
            save_pretrained(model, workdir / "model")
            atomic_write_json(workdir / "metrics.json", summary, indent=2)
            log(f"held-out test bpc: teacher-forced {test['bpc_teacher_forced']:.4f}, prefix-only "
                f"{test['bpc_prefix_only']:.4f} (gap {test['leak_gap_bpc']:+.4f}); validation teacher-forced "
                f"{final['val']['bpc_teacher_forced']:.4f}; {summary['train_tokens_per_s']:,.0f} train tokens/s; "
                f"model in {workdir / 'model'}")
            return summary
    finally:
        torch.set_num_threads(threads)
