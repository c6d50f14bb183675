"""Layout-independent initialisation (softmoe/distributed/init.py): a model built on meta,
sharded at EP 1, 2, 4 and materialised holds, bitwise, its rows of the one-process init.
The shards are built in one process (an `ExpertParallel` needs no process group to be built
or initialised), so every layout is checked without launching ranks; the torchrun trainer
tests (tests/train/test_distributed_train.py) check the same path end to end."""
from __future__ import annotations

import pytest
import torch

from softmoe import distributed as smd
from softmoe.layers import MoELayer
from softmoe.models.registry import create_model

MODELS = [("soft_moe_micro", {}), ("tc_moe_micro", {}), ("ec_moe_micro", {}),
          ("soft_moe_micro", {"moe": {"expert_init": "distinct"}}), ("vit_micro", {})]


def _sharded(name, overrides, ep_rank, ep_size):
    with torch.device("meta"):
        model = create_model(name, num_classes=10, **overrides)
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        layer.experts = smd.ExpertParallel(layer.experts, ep_rank, ep_size, None)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated before materialize
    return smd.materialize(model, "cpu", seed=7)


@pytest.mark.parametrize("name,overrides", MODELS)
def test_shards_equal_single_process_init_bitwise(name, overrides):
    ref = smd.init_weights(create_model(name, num_classes=10, **overrides), seed=7).state_dict()
    for ep in (1, 2, 4):  # DP replicas of a shard build the same shard: DP x EP is covered
        for r in range(ep):
            sd = _sharded(name, overrides, r, ep).state_dict()
            assert sd.keys() == ref.keys()
            for k, v in sd.items():
                full = ref[k]
                if v.shape != full.shape:  # an expert shard: rows r*El .. (r+1)*El - 1
                    El = v.shape[0]
                    assert full.shape[0] == El * ep, k
                    full = full[r * El:(r + 1) * El]
                assert torch.equal(v, full), (name, ep, r, k)


def test_keyed_init_keeps_the_constructor_distributions_and_the_global_rng():
    """Same initialisers as the constructor (other draws): constants equal exactly, random
    tensors with the same spread (within 15%: the smallest checked tensor has 2048 numbers,
    whose sample std is within a few % of the true one); the global RNG is not consumed."""
    torch.manual_seed(0)
    fresh = create_model("soft_moe_micro", num_classes=10, moe={"expert_init": "distinct"})
    model = create_model("soft_moe_micro", num_classes=10, moe={"expert_init": "distinct"})
    state = torch.random.get_rng_state()
    smd.init_weights(model, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    changed = 0
    for (n, p), (_, q) in zip(model.named_parameters(), fresh.named_parameters()):
        constant = q.numel() == 1 or bool(q.std() == 0)
        if constant or q.numel() < 2048:
            if constant:
                assert torch.equal(p, q), n
            continue
        assert not torch.equal(p, q), n
        assert abs(p.std() / q.std() - 1) < 0.15 and abs(p.mean() - q.mean()) < 0.1 * q.std() + 1e-7, n
        changed += 1
    assert changed >= 10


def test_identical_experts_are_copies_and_distinct_ones_differ():
    same = smd.init_weights(create_model("soft_moe_micro", num_classes=10), seed=0)
    diff = smd.init_weights(create_model("soft_moe_micro", num_classes=10, moe={"expert_init": "distinct"}), seed=0)
    for model, identical in ((same, True), (diff, False)):
        for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
            for p in layer.experts.parameters():
                assert torch.equal(p[1], p[0]) is identical


def test_seed_changes_the_draws_and_meta_is_refused():
    a = smd.init_weights(create_model("vit_micro", num_classes=10), seed=0)
    b = smd.init_weights(create_model("vit_micro", num_classes=10), seed=1)
    assert not torch.equal(a.pos_embed, b.pos_embed)
    with torch.device("meta"):
        m = create_model("vit_micro", num_classes=10)
    with pytest.raises(ValueError, match="meta device"):
        smd.init_weights(m, seed=0)
    assert smd.param_key(0, "a") != smd.param_key(0, "b") and smd.param_key(3, "x", 1) == smd.param_key(3, "x", 1)
