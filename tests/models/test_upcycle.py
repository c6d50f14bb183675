"""Sparse upcycling: every expert is bitwise the dense MLP it replaces, all other weights are
copied, routers/gates are fresh; and the function at initialisation is exactly what the
routing math says (equal to the dense model only where the routing weights sum to one per
token over copies of f(x_n) alone: identity Soft MoE, Tokens Choice with k = E, Experts
Choice with capacity = all tokens).

Device-agnostic (tests/conftest.py): the dense model on the `device` under test (upcycle builds
the MoE model on the dense model's device), images drawn there; tolerances unchanged (float64
1e-12; float32 2e-6 with TF32 off, torch's default for CUDA matmuls). The argument errors
build a model but compute nothing and stay on the CPU."""
import math

import pytest
import torch

from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.models import create_model, upcycle, upcycling_gap
from softmoe.models.layers import Mlp

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_dim=48, num_classes=5)  # 16 tokens


def _dense(dtype=torch.float32, device="cpu"):
    model = create_model("vit_micro", **TINY).to(dtype).to(device)
    with torch.no_grad():  # the zero-initialised head would hide every difference in the logits
        model.head.weight.normal_(0, 1 / math.sqrt(32))
        model.head.bias.zero_()
    return model.eval()


def _images(dtype=torch.float32, n=4, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.rand(n, 3, 16, 16, dtype=torch.float64, generator=g, device=device) * 2 - 1).to(dtype)


@pytest.mark.parametrize("moe_type, cls", [("soft", SoftMoE), ("tc", TokensChoiceMoE), ("ec", ExpertsChoiceMoE)])
@pytest.mark.parametrize("placement, blocks", [("last_half", [2, 3]), ("last:1", [3]), ("every:2", [1, 3]),
                                               ([0, 2], [0, 2])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_are_the_dense_mlp_bitwise(moe_type, cls, placement, blocks, dtype, device):
    dense = _dense(dtype, device)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, moe_type, num_experts=4, placement=placement)
    assert moe.config.moe_type == cls.__name__ and moe.config.num_experts == 4
    assert moe.config.name == {"soft": "soft_moe_micro", "tc": "tc_moe_micro", "ec": "ec_moe_micro"}[moe_type]
    assert [i for i, b in enumerate(moe.blocks) if isinstance(b.mlp, cls)] == blocks
    for i in blocks:
        fc1, fc2 = dense.blocks[i].mlp.fc1, dense.blocks[i].mlp.fc2
        ex = moe.blocks[i].mlp.experts
        for e in range(4):
            assert torch.equal(ex.w1[e], fc1.weight.T) and torch.equal(ex.b1[e], fc1.bias)
            assert torch.equal(ex.w2[e], fc2.weight.T) and torch.equal(ex.b2[e], fc2.bias)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    for key, value in dense_state.items():  # every other weight copied bitwise
        block = int(key.split(".")[1]) if key.startswith("blocks.") else None
        if block in blocks and ".mlp." in key:
            assert key not in moe_state
        else:
            assert moe_state[key].dtype == dtype and torch.equal(moe_state[key], value), key
    for key, value in dense.state_dict().items():  # the dense model is left alone
        assert torch.equal(value, before[key]), key
    assert {p.dtype for p in moe.parameters()} == {dtype}
    assert {p.device for p in moe.parameters()} == {next(dense.parameters()).device}
    assert not moe.training  # the dense model's mode


def test_router_and_gates_are_fresh(device):
    dense = _dense(device=device)
    D, E = 32, 8
    torch.manual_seed(1)
    a = upcycle(dense, "soft", num_experts=E)
    torch.manual_seed(2)
    b = upcycle(dense, "soft", num_experts=E)
    phi_a, phi_b = a.blocks[3].mlp.router.phi, b.blocks[3].mlp.router.phi
    assert phi_a.shape == (D, E, 1) and not torch.equal(phi_a, phi_b)
    assert a.blocks[3].mlp.router.scale.item() == 1.0
    std = torch.cat([blk.mlp.router.phi.flatten() for blk in a.blocks[2:]]).std().item()
    assert abs(std / (1 / math.sqrt(D * E)) - 1) < 0.15  # lecun normal, fan_in = D*E
    for moe_type in ("tc", "ec"):
        gate = upcycle(dense, moe_type, num_experts=E).blocks[3].mlp.gate.weight
        assert gate.shape == (D, E) and abs(gate.std().item() * math.sqrt(D) - 1) < 0.2  # lecun, fan_in = D


def test_errors():
    dense = _dense()
    with pytest.raises(ValueError, match="dense ViT"):
        upcycle(create_model("soft_moe_micro", **TINY, num_experts=4), "soft", 4)
    with pytest.raises(ValueError, match="moe_type must be one of"):
        upcycle(dense, "switch", 4)
    with pytest.raises(ValueError, match="MoE option\\(s\\) \\['k'\\] do not apply to SoftMoE"):
        upcycle(dense, "soft", 4, k=2)
    with pytest.raises(ValueError, match="placement must be"):
        upcycle(dense, "soft", 4, placement="last:9")
    with pytest.raises(ValueError, match="blocks\\[i\\].mlp"):
        upcycle(torch.nn.Linear(2, 2), "soft", 4)


# -- the function at initialisation --------------------------------------------------------------
EXACT = [  # (moe_type, num_experts, kwargs): settings where the upcycled model IS the dense one
    ("soft", 16, dict(dispatch="identity", combine="identity")),  # token i -> slot i, N = E = 16
    ("soft", 8, dict(slots_per_expert=2, dispatch="identity", combine="identity")),
    ("tc", 4, dict(k=4, capacity_factor=1.0, capacity_multiple_of=None)),  # all experts, nothing dropped
    ("ec", 4, dict(capacity_factor=4.0)),  # every expert takes every token
]


@pytest.mark.parametrize("moe_type, E, kwargs", EXACT)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_upcycled_equals_dense_where_routing_sums_to_one(moe_type, E, kwargs, dtype, tol, device):
    dense = _dense(dtype, device)
    moe = upcycle(dense, moe_type, E, placement="all", **kwargs)
    gap = upcycling_gap(dense, moe, _images(dtype, device=device))
    assert sorted(gap["layers"]) == [0, 1, 2, 3]
    for name, (max_abs, rel) in [("logits", gap["logits"]), ("features", gap["features"]), *gap["layers"].items()]:
        assert rel <= tol, (name, max_abs, rel)


def _per_token_scale(y, f):
    """c (tokens,) with y_n = c_n f_n, and the worst residual of that fit relative to |f|."""
    y, f = y.reshape(-1, y.shape[-1]), f.reshape(-1, f.shape[-1])
    c = (y * f).sum(-1) / (f * f).sum(-1)
    return c, ((y - c[:, None] * f).abs().max() / f.abs().max()).item()


def test_sparse_layers_scale_each_token_by_its_summed_gates(device, generator):
    """With identical experts, TC/EC output c_n * f(x_n): c_n = the gates of the kept choices
    (TC, not renormalised: top-1 gate ~0.3 here) or of the experts that picked the token (EC: 0 for
    tokens nobody picked). Soft MoE output is no such multiple: slots mix tokens."""
    dense = _dense(torch.float64, device)
    x = torch.randn(4, 16, 32, dtype=torch.float64, generator=generator, device=device)
    f = dense.blocks[3].mlp(x)
    E = 8
    tc = upcycle(dense, "tc", E, capacity_factor=100.0).blocks[3].mlp  # top-1, nothing dropped
    c, resid = _per_token_scale(tc(x), f)
    gates = torch.softmax(x @ tc.gate.weight, -1).amax(-1).flatten()
    assert resid < 1e-12 and torch.allclose(c, gates, rtol=0, atol=1e-12)
    assert c.max().item() < 1 and c.mean().item() < 0.5  # the upcycled TC layer shrinks the MLP output
    # C = ceil(16 * 0.5 / 8) = 1: at most 8 of each image's 16 tokens are kept, the rest give 0.
    tc_drop = upcycle(dense, "tc", E, capacity_factor=0.5, capacity_multiple_of=None).blocks[3].mlp
    c, resid = _per_token_scale(tc_drop(x), f)
    assert resid < 1e-12 and (c == 0).sum().item() >= 4 * 8
    ec = upcycle(dense, "ec", E).blocks[3].mlp  # C = 16 * 1.0 / 8 = 2 tokens per expert per image
    c, resid = _per_token_scale(ec(x), f)
    assert resid < 1e-12 and (c == 0).any() and 0 <= c.min() and c.max() <= 1 + 1e-12
    soft = upcycle(dense, "soft", E).blocks[3].mlp
    _, resid = _per_token_scale(soft(x), f)
    assert resid > 0.1


def test_default_upcycling_is_far_from_dense(device):
    """The measured gaps documented in docs/models.md (float32, tiny model): each MoE layer
    differs from the MLP by tens of percent at initialisation."""
    dense = _dense(device=device)
    x = _images(device=device)
    for moe_type in ("soft", "tc", "ec"):
        gap = upcycling_gap(dense, upcycle(dense, moe_type, 8), x)
        assert sorted(gap["layers"]) == [2, 3]
        assert all(rel > 0.2 for _, rel in gap["layers"].values()), (moe_type, gap)
        assert gap["features"][1] > 0.05, (moe_type, gap)


def test_upcycled_model_trains_and_keeps_mlps(device):
    dense = _dense(device=device)
    moe = upcycle(dense, "soft", 4).train()
    loss = moe(_images(device=device)).square().mean()
    loss.backward()
    assert moe.blocks[3].mlp.router.phi.grad is not None and moe.blocks[3].mlp.experts.w1.grad.abs().sum() > 0
    assert isinstance(moe.blocks[0].mlp, Mlp)
