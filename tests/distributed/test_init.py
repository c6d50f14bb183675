"""Layout-independent initialisation (softmoe/distributed/init.py): a model built on meta,
sharded at EP 1, 2, 4 and materialised holds, bitwise, its rows of the one-process init.
The shards are built in one process per rank on torch's fake process group (a DeviceMesh of any
size, collectives that do nothing: building and initialising the DTensor shards sends nothing),
so every layout is checked without a real process group; the multi-process tests
(tests/distributed/test_fsdp.py, tests/train/test_distributed_train.py) check the same path
end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from softmoe import distributed as smd
from softmoe.layers import MoELayer
from softmoe.models.registry import create_model

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EP_SIZES = (1, 2, 4)
MODELS = [("soft_moe_micro", {}), ("tc_moe_micro", {}), ("ec_moe_micro", {}),
          ("soft_moe_micro", {"moe": {"expert_init": "distinct"}}), ("vit_micro", {})]


def check_rank(rank):
    """In this process, as `rank` of each world of EP_SIZES that has it, on torch's fake process
    group: every model's shards equal, bitwise, their rows of the single-process init."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    refs = {(name, str(overrides)): smd.init_weights(create_model(name, num_classes=10, **overrides), seed=7)
            .state_dict() for name, overrides in MODELS}
    for world in [w for w in EP_SIZES if w > rank]:
        dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
        try:
            for name, overrides in MODELS:
                ref = refs[(name, str(overrides))]
                with torch.device("meta"):
                    model = create_model(name, num_classes=10, **overrides)
                mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
                for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
                    kind = type(layer.experts)
                    smd.shard_experts(layer.experts, mesh)  # in place: same module, same type, in the model
                    assert type(layer.experts) is kind and smd.is_sharded(layer.experts)
                assert all(p.is_meta for p in model.parameters())  # nothing allocated before materialize
                sd = {k: smd.local(v) for k, v in smd.materialize(model, "cpu", seed=7).state_dict().items()}
                assert sd.keys() == ref.keys()
                for k, v in sd.items():
                    full = ref[k]
                    if v.shape != full.shape:  # an expert shard: rows r*El .. (r+1)*El - 1
                        El = v.shape[0]
                        assert full.shape[0] == El * world, k
                        full = full[rank * El:(rank + 1) * El]
                    assert torch.equal(v, full), (name, world, rank, k)
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_shards_equal_single_process_init_bitwise(rank):
    """Rank `rank` at EP 1, 2, 4 (where it exists), one process per rank: DTensor caches sharding
    decisions per process, keyed on meshes that compare equal across fake groups of one shape,
    so one process must not play two ranks of one world. DP replicas of a shard build the same
    shard: DP x EP is covered."""
    code = "import test_init as t, sys; t.check_rank(int(sys.argv[1])); print('ok')"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    p = subprocess.run([sys.executable, "-c", code, str(rank)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stdout + p.stderr[-3000:]


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
