"""timm interop: our models in timm's registry, timm ViTs converted to / upcycled into MoE
models, and our position-embedding resampling equal to timm's. Skipped when timm (which
needs torchvision) cannot be imported; see docs/models.md for the install commands.

The conversion, upcycling, training and resampling tests are device-agnostic
(tests/conftest.py): the timm model on the `device` under test (timm_to_moe and upcycle build
the MoE layers on its device), images drawn there. Registry and argument-error tests compute
nothing and stay on the CPU."""
import warnings

import pytest
import torch
from torch import nn

import softmoe
from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.models import resample_pos_embed, upcycle, upcycling_gap
from softmoe.models.timm_interop import MlpExperts, import_timm, register_timm_models, timm_to_moe

try:
    timm = import_timm()
except (ImportError, RuntimeError) as e:  # timm or torchvision missing (or a broken torchvision build)
    pytest.skip(f"timm is not importable ({type(e).__name__}: {e}); install it as docs/models.md says",
                allow_module_level=True)

from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402


def _timm_vit(dtype=torch.float32, device="cpu", **kw):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=1.5, num_classes=5)
    args.update(kw)
    return TimmViT(**args).to(dtype).to(device).eval()


def _images(dtype=torch.float32, device="cpu"):
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.rand(3, 3, 16, 16, dtype=torch.float64, generator=g, device=device) * 2 - 1).to(dtype)


# -- registry -----------------------------------------------------------------------------------
def test_timm_create_model_builds_our_models():
    names = register_timm_models()
    assert {"soft_moe_s16", "vit_micro", "tc_moe_b16", "ec_moe_micro"} <= set(names)
    assert set(names) <= set(timm.list_models())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call re-registers nothing (timm would warn)
        assert register_timm_models() == names
    model = timm.create_model("soft_moe_micro", num_classes=7)
    assert isinstance(model, softmoe.models.VisionTransformer)
    assert model.config.name == "soft_moe_micro" and model.config.num_classes == 7
    small = timm.create_model("soft_moe_s16", depth=2, img_size=32, num_experts=4, global_pool="avg", drop_rate=0.0,
                              drop_path_rate=0.0)
    assert small.config.embed_dim == 384 and small.config.pool == "gap" and small.blocks[1].mlp.num_experts == 4
    meta = timm.create_model("soft_moe_b16", device="meta")  # 3.7B parameters, built without memory
    assert meta.pos_embed.is_meta and meta.blocks[11].mlp.num_experts == 128
    data = timm.data.resolve_model_data_config(model)  # timm's pipeline maps [0, 1] pixels to [-1, 1]
    assert data["input_size"] == (3, 32, 32) and data["mean"] == data["std"] == (0.5, 0.5, 0.5)


def test_timm_create_model_errors():
    register_timm_models("soft_moe_micro")
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("soft_moe_micro", pretrained=True)
    with pytest.raises(ValueError, match="drop_path_rate=0.1 is not supported"):
        timm.create_model("soft_moe_micro", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="global_pool must be .. or one of"):
        timm.create_model("soft_moe_micro", global_pool="max")
    # timm's contract: an unknown constructor argument is a TypeError (as for a Python function)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['embed_dimm'\]; did you mean embed_dim"):
        timm.create_model("soft_moe_micro", embed_dimm=8)


def test_name_clash_with_timm_is_skipped(monkeypatch):
    from timm.models import _registry

    monkeypatch.setitem(_registry._model_to_module, "ec_moe_micro", "vision_transformer")
    with pytest.warns(UserWarning, match="timm already has a model named 'ec_moe_micro'"):
        assert register_timm_models("ec_moe_micro") == []


# -- converting timm ViTs -----------------------------------------------------------------------
@pytest.mark.parametrize("moe_type, cls", [("soft", SoftMoE), ("tc", TokensChoiceMoE), ("ec", ExpertsChoiceMoE)])
@pytest.mark.parametrize("placement, blocks", [("last_half", [2, 3]), ("every:2", [1, 3]), ("last:1", [3]),
                                               ([0], [0])])
def test_timm_to_moe_replaces_only_the_chosen_mlps(moe_type, cls, placement, blocks, device):
    dense = _timm_vit(device=device)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = timm_to_moe(dense, moe_type, num_experts=4, placement=placement)
    assert isinstance(moe, TimmViT) and moe is not dense
    assert [i for i, b in enumerate(moe.blocks) if isinstance(b.mlp, cls)] == blocks
    layer = moe.blocks[blocks[0]].mlp
    assert isinstance(layer.experts, MlpExperts) and layer.experts.hidden_dim == 48  # timm's hidden width
    assert isinstance(layer.experts.act, nn.GELU) and layer.experts.act.approximate == "none"  # timm's activation
    assert not torch.equal(layer.experts.w1[0], dense.blocks[blocks[0]].mlp.fc1.weight.T)  # fresh experts
    moe_state = moe.state_dict()
    for key, value in before.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) in blocks and ".mlp." in key:
            assert key not in moe_state
        else:
            assert torch.equal(moe_state[key], value), key
        assert torch.equal(dense.state_dict()[key], value)  # source untouched
    assert {p.device for p in moe.parameters()} == {next(dense.parameters()).device}
    assert moe(_images(device=device)).shape == (3, 5)


def test_timm_upcycle_experts_bitwise_and_exact_cases(device):
    dense = _timm_vit(torch.float64, device)
    moe = upcycle(dense, "soft", num_experts=4)
    for i in (2, 3):
        ex, fc1, fc2 = moe.blocks[i].mlp.experts, dense.blocks[i].mlp.fc1, dense.blocks[i].mlp.fc2
        assert torch.equal(ex.w1, fc1.weight.T.expand(4, -1, -1)) and torch.equal(ex.b1, fc1.bias.expand(4, -1))
        assert torch.equal(ex.w2, fc2.weight.T.expand(4, -1, -1)) and torch.equal(ex.b2, fc2.bias.expand(4, -1))
    x = _images(torch.float64, device)
    # 16 patches + the class token = 17 tokens: identity routing needs 17 slots.
    for model in (upcycle(dense, "soft", 17, placement="all", dispatch="identity", combine="identity"),
                  upcycle(dense, "tc", 4, placement="all", k=4, capacity_factor=1.0, capacity_multiple_of=None),
                  upcycle(dense, "ec", 4, placement="all", capacity_factor=4.0)):
        gap = upcycling_gap(dense, model, x)
        assert sorted(gap["layers"]) == [0, 1, 2, 3]
        assert max(rel for _, rel in [gap["logits"], gap["features"], *gap["layers"].values()]) < 1e-12, gap
    gap = upcycling_gap(dense, moe, x)  # soft routing mixes tokens: far from the dense function
    assert all(rel > 0.1 for _, rel in gap["layers"].values()), gap


def test_timm_moe_trains_with_aux_loss_and_dropout(device):
    dense = _timm_vit(device=device, proj_drop_rate=0.1)  # timm Mlp dropouts travel with the experts
    moe = timm_to_moe(dense, "tc", num_experts=4, init="upcycle").train()
    assert moe.blocks[3].mlp.experts.drop1.p == 0.1 and moe.blocks[3].mlp.training
    loss = moe(_images(device=device)).square().mean()
    aux = softmoe.collect_aux_loss(moe)
    assert aux is not None and aux.item() > 0
    (loss + aux).backward()
    assert moe.blocks[3].mlp.gate.weight.grad is not None


def test_timm_to_moe_bf16_and_inplace(device):
    dense = _timm_vit(torch.bfloat16, device)
    same = timm_to_moe(dense, "soft", num_experts=2, init="upcycle", inplace=True)
    assert same is dense and isinstance(dense.blocks[3].mlp, SoftMoE)
    assert {p.dtype for p in dense.parameters()} == {torch.bfloat16}
    assert dense(_images(torch.bfloat16, device)).dtype == torch.bfloat16


def test_timm_to_moe_errors():
    from timm.layers import Mlp, SwiGLU

    with pytest.raises(ValueError, match="timm VisionTransformer-like"):
        timm_to_moe(nn.Linear(2, 2))
    glu = _timm_vit(mlp_layer=SwiGLU)
    with pytest.raises(ValueError, match=r"blocks\[2\].mlp is a SwiGLU"):
        timm_to_moe(glu, "soft", 4)
    normed = _timm_vit()
    normed.blocks[3].mlp = Mlp(32, 48, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match=r"blocks\[3\].mlp has a norm layer"):
        timm_to_moe(normed, "soft", 4)
    with pytest.raises(ValueError, match="may not set 'hidden_dim'"):
        timm_to_moe(_timm_vit(), "soft", 4, hidden_dim=8)
    with pytest.raises(ValueError, match="init must be"):
        timm_to_moe(_timm_vit(), "soft", 4, init="copy")
    with pytest.raises(ValueError, match="placement must be"):
        timm_to_moe(_timm_vit(), "soft", 4, placement="every:0")


# -- position embedding -------------------------------------------------------------------------
@pytest.mark.parametrize("old, new", [(4, 8), (8, 4), (7, 12), ((3, 5), (6, 4))])
def test_resample_pos_embed_matches_timm(old, new, device, generator):
    from timm.layers import resample_abs_pos_embed

    og = (old, old) if isinstance(old, int) else old
    ng = (new, new) if isinstance(new, int) else new
    pos = torch.randn(1, og[0] * og[1], 16, generator=generator, device=device)
    ours = resample_pos_embed(pos, ng, old_grid=og)
    theirs = resample_abs_pos_embed(pos, new_size=list(ng), old_size=list(og), num_prefix_tokens=0)
    assert torch.equal(ours, theirs)


@pytest.mark.cpu_only  # a CPU torch build with a CUDA torchvision wheel: CPU tensors by definition
def test_import_timm_does_not_break_torchvision_ops_error():
    """With a CUDA torchvision wheel on CPU torch, nms must fail with torchvision's own error
    (the workaround only lets the import succeed)."""
    import torchvision

    if torchvision.extension._has_ops():
        pytest.skip("torchvision's C++ ops load here; the workaround is not in use")
    with pytest.raises(RuntimeError, match="Couldn't load custom C\\+\\+ ops"):
        torchvision.ops.nms(torch.rand(2, 4), torch.rand(2), 0.5)
