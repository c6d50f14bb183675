"""The trainer's evaluation: accuracy and mean loss over a split, in one process or sharded over
the W ranks of a torchrun job with the single process's result (docs/distributed.md
"Sharded evaluation").

The split is cut into K = ceil(n / batch_size) batches of consecutive examples, the batches
one process reads. Batch k runs on rank k % W, in round k // W. Every batch is padded to
batch_size examples (zero images, left out of the counts), and in the last round a rank with
no batch left runs an all-padding batch: all ranks run the same number of forward passes of
the same shape, as expert parallelism's all-to-alls need. Each batch gives (correct
predictions, float64 sum of its per-example losses); the per-batch values of every rank are
gathered and summed in batch order k = 0..K-1. The counts are exact; the loss is the single
process's bitwise whenever each batch's forward is (same batch, same shape: data parallelism
on the same hardware and thread count). Under expert parallelism an expert multiplies one
batch's tokens together with the other ep ranks' batches, which can move a logit by float
rounding (1e-7 relative), never the batch a token is routed with.

Routing groups (Tokens/Experts Choice with group_size G > 1) are the single process's: a
batch starts at a multiple of batch_size, and batch_size is a multiple of G. Only a last
partial batch whose real size is not a multiple of G routes its last real sequences together
with padding (one process without padding could not run it at all).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from softmoe.data.transforms import to_model_input


def eval_plan(num_examples: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list[tuple[int, int] | None]:
    """The batches `rank` evaluates, round by round: (start, stop) example ranges, None for an
    all-padding batch. Every rank gets ceil(K / world_size) rounds, K = ceil(num_examples /
    batch_size); rank r's round j holds batch j * world_size + r."""
    for name, value, minimum in (("num_examples", num_examples, 1), ("batch_size", batch_size, 1),
                                 ("world_size", world_size, 1), ("rank", rank, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
    K = math.ceil(num_examples / batch_size)
    plan = []
    for j in range(math.ceil(K / world_size)):
        k = j * world_size + rank
        plan.append((k * batch_size, min(num_examples, (k + 1) * batch_size)) if k < K else None)
    return plan


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, C) float32 logits, (B,) labels -> (B,) the loss of each example: softmax cross-entropy,
    or sigmoid cross-entropy summed over classes (as `trainer.classification_loss`, unsmoothed)."""
    if kind == "softmax":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "sigmoid":
        targets = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1)
    raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {kind!r}")


def _padded_batch(dataset, rows: tuple[int, int] | None, batch_size: int, img_size: int, device: torch.device):
    """(x (batch_size, C, img, img) float32, labels (batch_size,), real (batch_size,) bool) of
    the examples `rows` (None: none), padded with zero images."""
    start, stop = rows if rows is not None else (0, 0)
    images, labels = dataset.images[start:stop], dataset.labels[start:stop]
    pad = batch_size - (stop - start)
    if pad:
        images = torch.cat([images, images.new_zeros(pad, *dataset.images.shape[1:])])
        labels = torch.cat([labels, labels.new_zeros(pad)])
    real = torch.arange(batch_size) < stop - start
    return to_model_input(images.to(device), img_size), labels.to(device), real.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, img_size: int, batch_size: int, device: torch.device, autocast,
             loss_kind: str = "softmax", mesh=None) -> dict:
    """{"test_accuracy", "test_loss", "test_examples"} over the whole `dataset` (eval mode, no
    augmentation), computed as in the module docstring. `mesh` (softmoe.distributed.Mesh, world
    > 1): this rank evaluates its share and the result, equal on every rank, is the whole set's;
    a collective, so every rank calls it. None: one process."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"cannot evaluate an empty split ({getattr(dataset, 'split', '?')!r} has no examples)")
    batch_size = min(batch_size, n)  # a set smaller than one batch is one batch, unpadded
    world, rank = (1, 0) if mesh is None else (mesh.world_size, mesh.rank)
    plan = eval_plan(n, batch_size, world, rank)
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(plan), 2, dtype=torch.float64, device=device)  # (rounds, [correct, loss sum])
    try:
        for j, rows in enumerate(plan):
            x, y, real = _padded_batch(dataset, rows, batch_size, img_size, device)
            with autocast():
                logits = model(x)
            logits = logits.float()  # (batch_size, classes)
            loss = per_example_loss(logits, y, loss_kind).double()
            sums[j, 0] = ((logits.argmax(-1) == y) & real).sum()
            sums[j, 1] = torch.where(real, loss, 0.0).sum()
    finally:
        model.train(was_training)
    if world > 1:
        gathered = [torch.empty_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        sums = torch.stack(gathered, 1).reshape(-1, 2)  # (rounds * world, 2): row j*W + r = batch k
    K = math.ceil(n / batch_size)
    correct, loss_sum = sums[:K].sum(0).tolist()  # batch order; the padding rounds' rows are zero
    return {"test_accuracy": int(correct) / n, "test_loss": loss_sum / n, "test_examples": n}
