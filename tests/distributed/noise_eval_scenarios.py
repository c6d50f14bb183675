"""What each process of tests/distributed/test_noise_and_eval.py runs (sharded evaluation).

Run as a worker: `python noise_eval_scenarios.py SCENARIO RANK WORLD STORE_FILE TMP_DIR TIMEOUT_S`.
Each rank computes the single-process reference itself (the unparallelised model on the whole
set) and compares the sharded result with it; a mismatch raises and the process exits non-zero.
"""
from __future__ import annotations

import contextlib
import gc
import math
import sys

import torch

from softmoe import distributed as smd
from softmoe.data import ImageDataset
from softmoe.models import create_model
from softmoe.train import evaluate

N_EXAMPLES, BATCH = 37, 4  # K = 10 batches, the last of 1 example; 3 ranks: 4 rounds, 2 of them padding
E = 6  # experts: EP at world 2 and 3
SEED = 0


def build():
    return create_model("soft_moe_micro", img_size=8, patch_size=4, depth=2, embed_dim=16, num_heads=2, mlp_dim=32,
                        num_classes=5, in_chans=1, moe={"num_experts": E})


def test_set() -> ImageDataset:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N_EXAMPLES, 1, 8, 8), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 5, (N_EXAMPLES,), generator=gen)
    return ImageDataset(images, labels, [str(c) for c in range(5)], "random", "test")


def materialized(mesh=None):
    """The keyed-init model (the same numbers at every layout), parallelised over `mesh` if given."""
    with torch.device("meta"):
        model = build()
    if mesh is not None:
        smd.parallelize(model, mesh)
    return smd.materialize(model, "cpu", SEED)


def run(model, ds, mesh=None, loss_kind="softmax"):
    """evaluate() and the number of forward passes this rank made."""
    calls = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        return evaluate(model, ds, 8, BATCH, torch.device("cpu"), contextlib.nullcontext, loss_kind, mesh=mesh), calls
    finally:
        handle.remove()


def scenario_eval(rank, world, tmp):
    ds = test_set()
    rounds = math.ceil(math.ceil(N_EXAMPLES / BATCH) / world)
    for loss_kind in ("softmax", "sigmoid"):
        want, _ = run(materialized(), ds, loss_kind=loss_kind)  # one process, the whole set
        # data parallelism: the same batches as one process, so the same numbers, bitwise
        got, calls = run(materialized(), ds, smd.init_mesh(1), loss_kind)
        if got != want:
            raise AssertionError(f"dp={world} {loss_kind}: {got} != one process {want}")
        if calls != [BATCH] * rounds:
            raise AssertionError(f"dp={world}: forward passes {calls}, expected {rounds} of {BATCH} (its share only)")
        # expert parallelism: every rank runs `rounds` passes of one shape (padding), or the
        # all-to-alls would hang; an expert's matmul mixes the ep ranks' tokens (rounding only)
        model = materialized(smd.init_mesh(world))
        got, calls = run(model, ds, smd.mesh_of(model), loss_kind)
        if got["test_accuracy"] != want["test_accuracy"] or got["test_examples"] != N_EXAMPLES:
            raise AssertionError(f"ep={world} {loss_kind}: {got} != one process {want}")
        if not abs(got["test_loss"] - want["test_loss"]) <= 1e-6 * abs(want["test_loss"]):
            raise AssertionError(f"ep={world} {loss_kind}: loss {got['test_loss']!r} != {want['test_loss']!r}")
        if calls != [BATCH] * rounds:
            raise AssertionError(f"ep={world}: forward passes {calls}, expected {rounds} of {BATCH}")
    print(f"ok sharded eval world={world} rounds={rounds}: {want}", flush=True)


def main(argv):
    scenario, rank, world, store, tmp, timeout_s = argv
    torch.set_num_threads(1)
    smd.init_process_group("gloo", timeout_s=float(timeout_s), init_method=f"file://{store}",
                           rank=int(rank), world_size=int(world))
    globals()[f"scenario_{scenario}"](int(rank), int(world), tmp)
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
