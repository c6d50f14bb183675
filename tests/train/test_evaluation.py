"""The trainer's evaluation (softmoe/train/evaluation.py) in one process: the batch plan every
rank follows, padding that changes no real example's result, and the numbers against a
per-batch reference. The sharded runs (2 and 3 gloo processes) are in
tests/distributed/test_noise_and_eval.py.

Device-agnostic (tests/conftest.py): the model and `evaluate` on the `device` under test (the
datasets stay on the CPU; `evaluate` moves each batch), the references computed there too;
the batch plan is integer arithmetic."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from softmoe.data import ImageDataset
from softmoe.data.transforms import to_model_input
from softmoe.models import create_model
from softmoe.train import evaluate
from softmoe.train.evaluation import eval_plan, per_example_loss
from softmoe.train.trainer import classification_loss


@pytest.mark.parametrize("n", [1, 7, 16, 37])
@pytest.mark.parametrize("batch_size", [1, 5, 8, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_covers_every_batch_once_with_equal_rounds(n, batch_size, world):
    plans = [eval_plan(n, batch_size, world, r) for r in range(world)]
    K = math.ceil(n / batch_size)
    assert {len(p) for p in plans} == {math.ceil(K / world)}  # same number of forward passes everywhere
    in_order = [plans[k % world][k // world] for k in range(K)]  # batch k: rank k % W, round k // W
    assert in_order == [(k * batch_size, min(n, (k + 1) * batch_size)) for k in range(K)]
    assert sum(p.count(None) for p in plans) == len(plans[0]) * world - K  # the rest is padding


@pytest.mark.parametrize("args,message", [((0, 4, 1, 0), "num_examples must be an integer >= 1"),
                                          ((5, 0, 1, 0), "batch_size must be an integer >= 1"),
                                          ((5, 4, 0, 0), "world_size must be an integer >= 1"),
                                          ((5, 4, 2, 2), "rank must be < world_size=2"),
                                          ((5, 4, 2, -1), "rank must be an integer >= 0")])
def test_plan_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        eval_plan(*args)


def tiny_model(**moe):
    torch.manual_seed(0)
    return create_model("soft_moe_micro", img_size=8, patch_size=4, depth=2, embed_dim=16, num_heads=2, mlp_dim=32,
                        num_classes=5, in_chans=1, moe={"num_experts": 4, **moe})


def random_set(n: int, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 5, (n,), generator=gen), [str(c) for c in range(5)], "random", "test")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_evaluate_equals_the_unpadded_per_batch_reference(kind, device):
    """37 examples in batches of 8 (the last one, of 5, padded): accuracy exactly the reference's
    count, loss the float64 mean of the per-example losses (1e-6: padding changes a batch's
    shape, which may move a float32 logit by rounding), the batch-mean loss the trainer's."""
    model, ds = tiny_model().to(device), random_set(37)
    got = evaluate(model, ds, 8, 8, device, contextlib.nullcontext, kind)
    assert model.training  # the mode is restored
    correct, losses = 0, []
    with torch.no_grad():
        model.eval()
        for i in range(0, 37, 8):
            x, y = to_model_input(ds.images[i:i + 8].to(device), 8), ds.labels[i:i + 8].to(device)
            logits = model(x)
            correct += int((logits.argmax(-1) == y).sum())
            per = per_example_loss(logits, y, kind)
            assert abs(per.mean().item() - classification_loss(logits, y, kind).item()) < 1e-6
            losses.append(per.double())
    assert got["test_examples"] == 37
    assert got["test_accuracy"] == correct / 37
    assert got["test_loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-6)


def test_padding_changes_no_real_example(device):
    """A batch padded with zero images gives its real examples the numbers they get alone
    (Soft MoE routes each image by itself): so a sharded run's padding is invisible."""
    model, ds = tiny_model().eval().to(device), random_set(13)
    images = ds.images.to(device)
    with torch.no_grad():
        alone = model(to_model_input(images[8:13], 8))
        padded = model(to_model_input(torch.cat([images[8:13], images.new_zeros(3, 1, 8, 8)]), 8))[:5]
    assert (alone - padded).abs().max().item() < 1e-6


def test_groups_of_sequences_stay_the_single_process_groups(device):
    """Tokens Choice with group_size 2: batches start at multiples of the batch size, so the
    groups are those of one process reading the set in order (the padded last batch of 4 real
    examples only adds groups of its own)."""
    model = tiny_model(type="tc", group_size=2).to(device)
    ds = random_set(12)
    got = evaluate(model, ds, 8, 8, device, contextlib.nullcontext)
    images, labels = ds.images.to(device), ds.labels.to(device)
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(to_model_input(images[i:i + 8], 8)) for i in (0, 8)])
    assert got["test_accuracy"] == (logits.argmax(-1) == labels).double().mean().item()
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits.double(), labels).item(), rel=1e-6)


def test_empty_split_is_an_error(device):
    ds = random_set(1)
    ds.images, ds.labels = ds.images[:0], ds.labels[:0]
    with pytest.raises(ValueError, match="cannot evaluate an empty split"):
        evaluate(tiny_model().to(device), ds, 8, 8, device, contextlib.nullcontext)
