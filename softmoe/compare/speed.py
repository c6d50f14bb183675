"""Throughput of every model of a comparison, measured side by side in one process.

The runs themselves go in parallel worker processes over hours, on a machine whose load
changes, so their own images/s are not comparable between models. This phase times every
model under the same conditions instead: one training step (forward, backward, optimizer
step) on a batch of the recipe's size and one inference forward on the same batch, models
taken round-robin (so that load changes hit all alike), medians over the rounds.
"""
from __future__ import annotations

import statistics
import time

WARMUP, ROUNDS = 2, 5


def measure_speed(specs, batch_size: int, threads: int, device: str = "cpu", rounds: int = ROUNDS,
                  log=print) -> dict[str, dict]:
    """{model key: {"train_images_per_s", "infer_images_per_s"}} for ModelSpecs `specs`, at
    `threads` torch threads, random inputs of the models' shape (speed does not depend on the
    values), medians over `rounds` round-robin rounds after WARMUP untimed ones."""
    import torch

    from softmoe._device import resolve_device
    from softmoe.models import create_model

    dev = resolve_device(device)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        built = {}
        for s in specs:
            torch.manual_seed(0)
            model = create_model(s.model, **s.overrides).to(dev)
            cfg = model.config
            x = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen).to(dev)
            y = torch.randint(0, max(1, cfg.num_classes), (batch_size,), generator=gen).to(dev)
            built[s.key] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), x, y)
        times: dict[str, dict[str, list[float]]] = {k: {"train": [], "infer": []} for k in built}
        for r in range(WARMUP + rounds):
            for key, (model, opt, x, y) in built.items():
                t_train, t_infer = _step(model, opt, x, y, dev), _infer(model, x, dev)
                if r >= WARMUP:
                    times[key]["train"].append(t_train)
                    times[key]["infer"].append(t_infer)
        out = {k: {"train_images_per_s": batch_size / statistics.median(t["train"]),
                   "infer_images_per_s": batch_size / statistics.median(t["infer"])} for k, t in times.items()}
    finally:
        torch.set_num_threads(prev)
    log(f"throughput: {len(specs)} models, batch {batch_size}, {threads} thread(s), medians of {rounds} "
        f"round-robin rounds")
    return out


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _step(model, opt, x, y, dev) -> float:
    import torch.nn.functional as F

    from softmoe.layers import collect_aux_loss

    model.train()
    _sync(dev)
    t = time.perf_counter()
    loss = F.cross_entropy(model(x), y) + collect_aux_loss(model)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    _sync(dev)
    return time.perf_counter() - t


def _infer(model, x, dev) -> float:
    import torch

    model.eval()
    _sync(dev)
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    _sync(dev)
    return time.perf_counter() - t
