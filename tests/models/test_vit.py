"""The ViT of docs/design.md §3: exact forward math against an independent float64 reference,
initialisation, MoE placement, the model surface (contracts.md) and input validation.

The forward tests are device-agnostic (tests/conftest.py): model and input on the `device`
under test, the float64 reference (einsums on the raw parameters) computed there too."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.models import MoEConfig, ViTConfig, VisionTransformer, build_model, create_model
from softmoe.models.vit import moe_block_indices

MICRO = dict(img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=32, depth=4, num_heads=2, mlp_dim=48)


# -- independent float64 reference (einsums on the raw parameters) ----------------------------
def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps) * w
    return y if b is None else y + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _attention(y, P, pre, h):
    B, N, D = y.shape
    d = D // h
    q, k, v = (y @ P[f"{pre}.qkv.weight"].T + P[f"{pre}.qkv.bias"]).split(D, dim=-1)
    q, k, v = (t.reshape(B, N, h, d) for t in (q, k, v))
    q = _ln(q, P[f"{pre}.q_norm.weight"], None)  # qk-LayerNorm over the head dim, no bias
    k = _ln(k, P[f"{pre}.k_norm.weight"], None)
    a = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d), dim=-1)
    o = torch.einsum("bhnm,bmhd->bnhd", a, v).reshape(B, N, D)
    return o @ P[f"{pre}.proj.weight"].T + P[f"{pre}.proj.bias"]


def _soft_moe(x, P, pre):
    phi, scale = P[f"{pre}.router.phi"], P[f"{pre}.router.scale"]  # (D, E, S/E)
    D, E, Ps = phi.shape
    xn = x * torch.rsqrt((x ** 2).sum(-1, keepdim=True) + 1e-6)
    phin = phi * torch.rsqrt((phi ** 2).sum(0, keepdim=True) + 1e-6)
    logits = scale * torch.einsum("bnd,dep->bnep", xn, phin).flatten(2)  # (B, N, S)
    dw = torch.softmax(logits, dim=1)
    cw = torch.softmax(logits, dim=2)
    slots = torch.einsum("bns,bnd->bsd", dw, x).reshape(x.shape[0], E, Ps, D)  # un-normalised x
    w1, b1, w2, b2 = (P[f"{pre}.experts.{n}"] for n in ("w1", "b1", "w2", "b2"))
    hdn = _gelu_tanh(torch.einsum("bepd,edh->beph", slots, w1) + b1[:, None])
    ys = (torch.einsum("beph,ehd->bepd", hdn, w2) + b2[:, None]).flatten(1, 2)  # (B, S, D)
    return torch.einsum("bns,bsd->bnd", cw, ys)


def reference_forward(model, x):
    cfg = model.config
    P = dict(model.named_parameters())
    B, C, p = x.shape[0], cfg.in_chans, cfg.patch_size
    g = cfg.img_size // p
    patches = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    t = patches @ P["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1).T + P["patch_embed.proj.bias"]
    t = t + P["pos_embed"]
    if cfg.pool == "token":
        t = torch.cat([P["cls_token"].expand(B, 1, -1), t], dim=1)
    for i in range(cfg.depth):
        pre = f"blocks.{i}"
        t = t + _attention(_ln(t, P[f"{pre}.norm1.weight"], P[f"{pre}.norm1.bias"]), P, f"{pre}.attn", cfg.num_heads)
        y = _ln(t, P[f"{pre}.norm2.weight"], P[f"{pre}.norm2.bias"])
        if i in cfg.moe_blocks:
            t = t + _soft_moe(y, P, f"{pre}.mlp")
        else:
            hdn = _gelu_tanh(y @ P[f"{pre}.mlp.fc1.weight"].T + P[f"{pre}.mlp.fc1.bias"])
            t = t + hdn @ P[f"{pre}.mlp.fc2.weight"].T + P[f"{pre}.mlp.fc2.bias"]
    t = _ln(t, P["norm.weight"], P["norm.bias"])
    pooled = t[:, 0] if cfg.pool == "token" else t.mean(1)
    return t, pooled, pooled @ P["head.weight"].T + P["head.bias"]


def _randomised(device, cfg):
    """float64 model on `device` with every parameter random (zero heads / identical experts
    would hide bugs)."""
    model = build_model(cfg).double().eval().to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.numel() <= 16 else 0.0))
    return model


@pytest.mark.parametrize("pool", ["gap", "token"])
@pytest.mark.parametrize("moe", [False, True])
def test_forward_matches_float64_reference(pool, moe, device):
    extra = dict(moe=MoEConfig("SoftMoE", 3, slots_per_expert=2)) if moe else {}
    model = _randomised(device, ViTConfig(**MICRO, pool=pool, **extra))
    x = torch.rand(3, 3, 16, 16, dtype=torch.float64, device=device) * 2 - 1
    tokens, pooled, logits = reference_forward(model, x)
    n_tok = 16 + (pool == "token")
    assert model.forward_features(x).shape == (3, n_tok, 32)
    torch.testing.assert_close(model.forward_features(x), tokens, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pooled,
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(model(x), logits, rtol=0, atol=1e-10)


def test_map_head_matches_reference(device):
    model = _randomised(device, ViTConfig(**MICRO, pool="map"))
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, device=device)
    t = model.forward_features(x)
    P = dict(model.named_parameters())
    D, h = 32, 2
    q = (P["attn_pool.probe"] @ P["attn_pool.q.weight"].T + P["attn_pool.q.bias"]).reshape(1, h, D // h)
    k, v = (t @ P["attn_pool.kv.weight"].T + P["attn_pool.kv.bias"]).split(D, -1)
    k, v = k.reshape(2, 16, h, D // h), v.reshape(2, 16, h, D // h)
    a = torch.softmax(torch.einsum("qhd,bmhd->bhm", q, k) / math.sqrt(D // h), -1)
    y = torch.einsum("bhm,bmhd->bhd", a, v).reshape(2, D) @ P["attn_pool.proj.weight"].T + P["attn_pool.proj.bias"]
    z = _ln(y, P["attn_pool.norm.weight"], P["attn_pool.norm.bias"])
    hid = _gelu_tanh(z @ P["attn_pool.mlp.fc1.weight"].T + P["attn_pool.mlp.fc1.bias"])
    y = y + hid @ P["attn_pool.mlp.fc2.weight"].T + P["attn_pool.mlp.fc2.bias"]
    torch.testing.assert_close(model.forward_head(t, pre_logits=True), y, rtol=0, atol=1e-10)
    assert model(x).shape == (2, 7)


def test_initialisation_follows_vmoe():
    model = create_model("soft_moe_micro", num_classes=29)
    assert torch.count_nonzero(model.head.weight) == 0
    torch.testing.assert_close(model.head.bias, torch.full((29,), -math.log(29)))
    big = build_model(ViTConfig(**{**MICRO, "img_size": 64, "embed_dim": 256, "num_heads": 4}))
    assert abs(big.pos_embed.std().item() - 0.02) < 0.0005  # 65k samples: std error ~6e-5
    assert abs(big.pos_embed.mean().item()) < 0.0005
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    attn = model.blocks[0].attn
    assert attn.q_norm.bias is None and attn.k_norm.bias is None
    assert attn.q_norm.normalized_shape == (32,)  # head dim 64 / 2 heads
    # q, k, v each xavier-uniform over (D, D): bound sqrt(6 / 128)
    bound = math.sqrt(6 / 128)
    for w in attn.qkv.weight.split(64):
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.blocks[0].mlp.fc1.bias.abs().max() < 1e-5  # N(0, 1e-6)
    assert isinstance(model.blocks[2].mlp, SoftMoE) and model.blocks[2].mlp.experts.hidden_dim == 256
    # A different seed changes the pos embedding: nothing is left uninitialised.
    assert not torch.equal(create_model("vit_micro").pos_embed, create_model("vit_micro").pos_embed)


def test_gelu_is_tanh_approximation(device):
    model = create_model("vit_micro").double().to(device)
    mlp = model.blocks[0].mlp
    x = torch.randn(5, 64, dtype=torch.float64, device=device) * 3
    ref = _gelu_tanh(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), ref, rtol=0, atol=1e-12)
    exact = F.gelu(x @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
    assert (mlp(x) - exact).abs().max() > 1e-6  # would pass with the erf GELU otherwise


@pytest.mark.parametrize("placement,expected", [
    ("last_half", (6, 7, 8, 9, 10, 11)), ("last:4", (8, 9, 10, 11)), ("every:2", (1, 3, 5, 7, 9, 11)),
    ("every:3", (2, 5, 8, 11)), ("all", tuple(range(12))), ([0, 11, 5], (0, 5, 11))])
def test_moe_placement(placement, expected):
    assert moe_block_indices(placement, 12) == expected
    with torch.device("meta"):
        model = create_model("soft_moe_s16", moe_placement=placement)
    assert tuple(i for i, b in enumerate(model.blocks) if isinstance(b.mlp, SoftMoE)) == expected


def test_last_half_odd_depth_and_micro():
    assert moe_block_indices("last_half", 5) == (3, 4)
    model = create_model("soft_moe_micro")
    assert [type(b.mlp).__name__ for b in model.blocks] == ["Mlp", "Mlp", "SoftMoE", "SoftMoE"]


@pytest.mark.parametrize("bad", ["last:0", "last:13", "every:0", "first_half", [12], [1, 1], [], [True], "last:x"])
def test_bad_placement_is_a_value_error(bad):
    with pytest.raises(ValueError, match="placement"):
        ViTConfig(depth=12, moe=MoEConfig("soft", 4, placement=bad))


@pytest.mark.parametrize("name,cls", [("soft_moe_micro", SoftMoE), ("tc_moe_micro", TokensChoiceMoE),
                                      ("ec_moe_micro", ExpertsChoiceMoE)])
def test_moe_families_build_run_and_backprop(name, cls, device):
    model = create_model(name).to(device)
    moes = [b.mlp for b in model.blocks if isinstance(b.mlp, cls)]
    assert len(moes) == 2 and all(m.num_experts == 8 for m in moes)
    x = torch.rand(4, 3, 32, 32, device=device) * 2 - 1
    model.train()
    loss = model(x).logsumexp(-1).mean()
    from softmoe import collect_aux_loss

    aux = collect_aux_loss(model)
    if aux is not None:
        loss = loss + aux
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_moe_kwargs_are_passed_and_checked():
    model = create_model("soft_moe_micro", moe_kwargs={"slots_per_expert": 3})
    assert model.blocks[3].mlp.router.phi.shape == (64, 8, 3)
    model = create_model("tc_moe_micro", moe_kwargs={"k": 2, "capacity_factor": 1.5})
    assert model.blocks[3].mlp.k == 2 and model.blocks[3].mlp.capacity_factor == 1.5
    with pytest.raises(ValueError, match="slots_per_expert"):
        create_model("tc_moe_micro", moe_kwargs={"slots_per_expert": 2})
    with pytest.raises(ValueError, match="hidden_dim"):
        create_model("soft_moe_micro", moe_kwargs={"hidden_dim": 2})


def test_soft_moe_model_is_per_image_deterministic(device):
    """Soft MoE routes each image on its own: an image's logits never depend on the batch."""
    model = create_model("soft_moe_micro").double().eval().to(device)
    x = torch.rand(5, 3, 32, 32, dtype=torch.float64, device=device)
    torch.testing.assert_close(model(x)[2:3], model(x[2:3]), rtol=0, atol=1e-12)


def test_meta_build_of_54b_model_allocates_nothing():
    with torch.device("meta"):
        model = create_model("soft_moe_h14", num_experts=256, num_classes=29593)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 54_177_406_889
    assert model.config.moe_blocks == tuple(range(16, 32))


def test_reset_classifier_and_no_head():
    model = create_model("vit_micro")
    model.reset_classifier(3)
    assert model.head.out_features == 3 and model.config.num_classes == 3
    torch.testing.assert_close(model.head.bias, torch.full((3,), -math.log(3)))
    x = torch.rand(2, 3, 32, 32)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64) and model.config.num_classes == 0
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    model = create_model("vit_micro").double()
    model.reset_classifier(4)
    assert model.head.weight.dtype == torch.float64 and model(x.double()).shape == (2, 4)
    with torch.device("meta"):
        big = create_model("soft_moe_h14")
    big.reset_classifier(29593)
    assert big.head.weight.is_meta and big.head.out_features == 29593


def test_no_weight_decay_names():
    model = create_model("soft_moe_micro", pool="token")
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    for n in ("pos_embed", "cls_token", "norm.weight", "norm.bias", "blocks.3.mlp.router.phi",
              "blocks.3.mlp.experts.b1", "blocks.3.mlp.experts.b2", "blocks.0.attn.q_norm.weight",
              "blocks.0.norm1.weight", "blocks.0.mlp.fc1.bias", "head.bias", "patch_embed.proj.bias"):
        assert n in nwd, n
    for n in ("blocks.3.mlp.router.scale", "blocks.3.mlp.experts.w1", "blocks.0.attn.qkv.weight", "head.weight",
              "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        assert n not in nwd, n
    # Everything not excluded is a kernel (or the router scale).
    assert all(names[n].ndim >= 2 or n.endswith("router.scale") for n in set(names) - nwd)


def test_config_json_round_trip_and_unknown_keys():
    cfg = create_model("soft_moe_micro", moe_placement=[1, 3], moe_kwargs={"slots_per_expert": 2}).config
    back = ViTConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="'embed_dimm'.*did you mean 'embed_dim'"):
        ViTConfig.from_dict({**cfg.to_dict(), "embed_dimm": 3})


@pytest.mark.parametrize("kwargs,match", [
    (dict(img_size=30, patch_size=4), "img_size=30 is not divisible by patch_size=4"),
    (dict(embed_dim=30, num_heads=4), "embed_dim=30 is not divisible by num_heads=4"),
    (dict(pool="avg"), "pool must be one of"),
    (dict(depth=0), "depth must be an int >= 1, got 0"),
    (dict(num_classes=2.5), "num_classes"),
    (dict(moe={"type": "switch", "num_experts": 2}), "moe_type must be one of"),
    (dict(moe={"type": "soft", "num_experts": 0}), "num_experts must be >= 1"),
    (dict(moe={"type": "soft"}), "moe type 'soft' needs num_experts"),
    (dict(moe={"num_experts": 4}), "num_experts=4 need a MoE layer type"),
    (dict(moe={"type": "soft", "num_experts": 2, "k": 2}), r"MoE option\(s\) \['k'\] do not apply to SoftMoE"),
    (dict(moe={"type": "ec", "num_experts": 2, "batch_priority": True}), r"\['batch_priority'\] do not apply"),
    (dict(moe={"type": "tc", "num_experts": 2, "capacity_factor": -1.0}),
     "capacity_factor must be a finite number > 0"),
    (dict(moe={"type": "soft", "num_experts": 2, "dispatch": "hard"}), "dispatch"),
    (dict(moe={"type": "soft", "num_experts": 2, "slots_per_expert": "2"}), "'slots_per_expert' must be int or None"),
    (dict(moe={"type": "soft", "num_experts": 2, "slot_per_expert": 1}), "did you mean 'slots_per_expert'"),
    (dict(moe="soft"), "'moe' must be MoEConfig or None, got 'soft'"),
    # the legacy flat keys
    (dict(moe_type="switch", num_experts=2), "moe_type must be one of"),
    (dict(moe_type="soft"), "moe type 'soft' needs num_experts"),
    (dict(num_experts=4), "num_experts=4 need a MoE layer type"),
    (dict(moe_type=None, num_experts=4), "num_experts=4 / moe_kwargs={} need a MoE layer type"),
    (dict(moe_type="soft", num_experts=2, moe_kwargs=[1]), "moe_kwargs must be a dict"),
])
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig.from_dict(kwargs)


def test_bad_inputs_at_forward(device):
    model = create_model("vit_micro").to(device)
    with pytest.raises(ValueError, match=r"in_chans=3.*got \(2, 1, 32, 32\)"):
        model(torch.rand(2, 1, 32, 32, device=device))
    with pytest.raises(ValueError, match="img_size=32.*got 48x48"):
        model(torch.rand(2, 3, 48, 48, device=device))
    with pytest.raises(ValueError, match="ViTConfig"):
        VisionTransformer({"embed_dim": 3})


def test_moe_type_aliases_are_canonicalised():
    assert ViTConfig(moe=MoEConfig("soft", 2)).moe_type == "SoftMoE"
    assert MoEConfig("tokens_choice", 2).type == "TokensChoiceMoE"
    assert ViTConfig.from_dict({"moe_type": "ec", "num_experts": 2}).moe.type == "ExpertsChoiceMoE"
