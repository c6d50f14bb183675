"""The char-LM training loop behind `softmoe train` for a config with `task="lm"`.

It reads the generic TrainConfig fields (steps, batch_size, lr, betas, eps, weight_decay,
grad_clip, schedule "cosine"/"constant" with warmup_steps and min_lr, seed, num_threads,
log_every, eval_every, eval_batch_size, workdir); `model` names a decoder of
softmoe/models/gpt.py with its GPTConfig overrides; `data` is the corpus ("pydoc" or a path).
Writes `<workdir>/model/` (save_pretrained) and `<workdir>/metrics.json`, atomically.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from softmoe._io import atomic_write_json
from softmoe.models.gpt import create_decoder, save_pretrained

from .bpc import bpc_prefix_only, bpc_teacher_forced
from .data import CharCorpus

VAL_FRACTION = 0.1  # the corpus's last 10% is held out
EVAL_WINDOWS = 64  # held-out windows for the teacher-forced bpc
PREFIX_WINDOWS = 8  # prefix-only costs T forwards per window: fewer windows (the same ones, first 8 of 64)


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


def evaluate(model, corpus: CharCorpus, block_size: int, batch_size: int) -> dict:
    model.eval()
    windows = corpus.val_windows(block_size, EVAL_WINDOWS)
    out = {"bpc_teacher_forced": bpc_teacher_forced(model, windows, batch_size),
           "bpc_teacher_forced_prefix_windows": bpc_teacher_forced(model, windows[:PREFIX_WINDOWS], batch_size),
           "bpc_prefix_only": bpc_prefix_only(model, windows[:PREFIX_WINDOWS], batch_size)}
    # The leak: teacher-forced minus prefix-only on the same windows (0 for a causal model).
    out["leak_gap_bpc"] = out["bpc_prefix_only"] - out["bpc_teacher_forced_prefix_windows"]
    model.train()
    return out


def train_lm(cfg, workdir=None, log=print) -> dict:
    if cfg.steps < 1:
        raise ValueError(f"task='lm' trains for steps >= 1 (epochs are not used), got steps={cfg.steps}")
    workdir = Path(workdir or cfg.workdir)
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        model = create_decoder(cfg.model.name, **cfg.model.overrides)
        T = model.config.block_size
        corpus = CharCorpus.from_spec(cfg.data, VAL_FRACTION, T)
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                eps=cfg.eps)
        gen = torch.Generator().manual_seed(cfg.seed)
        log(f"softmoe train (lm): {cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} params, "
            f"corpus {cfg.data!r}: {len(corpus.train):,} train / {len(corpus.val):,} held-out bytes")
        model.train()
        history, train_s = [], 0.0
        for step in range(cfg.steps):
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
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log(f"step {step + 1}/{cfg.steps} loss {loss.item():.4f} ({loss.item() / math.log(2):.3f} bpc)")
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                history.append({"step": step + 1, **evaluate(model, corpus, T, cfg.eval_batch_size)})
        final = evaluate(model, corpus, T, cfg.eval_batch_size)
        summary = {"model": cfg.model.name, "steps": cfg.steps, **final,
                   "train_tokens_per_s": cfg.steps * cfg.batch_size * T / max(train_s, 1e-9),
                   "params": sum(p.numel() for p in model.parameters()), "history": history}
        save_pretrained(model, workdir / "model")
        atomic_write_json(workdir / "metrics.json", summary, indent=2)
        log(f"held-out bpc: teacher-forced {final['bpc_teacher_forced']:.4f}, prefix-only "
            f"{final['bpc_prefix_only']:.4f} (gap {final['leak_gap_bpc']:+.4f}); "
            f"{summary['train_tokens_per_s']:,.0f} train tokens/s; model in {workdir / 'model'}")
        return summary
    finally:
        torch.set_num_threads(threads)
