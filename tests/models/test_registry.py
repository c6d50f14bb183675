"""The model registry: names generated from the size tables, overrides and error messages.

The one forward (`test_common_overrides_accepted_by_every_model`) runs on the `device` under
test (tests/conftest.py); everything else reads configs or builds on the meta device."""
import pytest
import torch

from softmoe.models import create_model, get_config, list_models, register_model
from softmoe.models import registry
from softmoe.models.vit import ViTConfig, build_model

SIZES = {"ti": (192, 12, 768, 3), "s": (384, 12, 1536, 6), "b": (768, 12, 3072, 12), "l": (1024, 24, 4096, 16),
         "h": (1280, 32, 5120, 16)}  # docs/design.md §3 table, typed in again on purpose


def test_names_cover_every_family_size_and_patch():
    names = list_models()
    assert len(names) == len(set(names)) == 4 * 5 * 4 + 4
    for fam in ("vit", "soft_moe", "tc_moe", "ec_moe"):
        assert f"{fam}_micro" in names
        for size in SIZES:
            for patch in (32, 16, 14, 8):
                assert f"{fam}_{size}{patch}" in names
    assert list_models("soft_moe_s*") == ["soft_moe_s32", "soft_moe_s16", "soft_moe_s14", "soft_moe_s8"]
    assert list_models("*_micro") == ["vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("size", list(SIZES))
def test_size_table(size):
    D, depth, H, heads = SIZES[size]
    cfg = get_config(f"soft_moe_{size}16")
    assert (cfg.embed_dim, cfg.depth, cfg.mlp_dim, cfg.num_heads) == (D, depth, H, heads)
    assert cfg.patch_size == 16 and cfg.img_size == 224 and cfg.pool == "gap" and cfg.qk_norm
    assert cfg.moe_type == "SoftMoE" and cfg.moe_blocks == tuple(range(depth // 2, depth))
    assert get_config(f"vit_{size}16").moe_type is None


def test_default_expert_counts_follow_the_paper():
    expected = {"soft_moe_s16": 128, "soft_moe_s14": 256, "soft_moe_b16": 128, "soft_moe_l16": 128,
                "soft_moe_h14": 128, "tc_moe_s14": 256, "soft_moe_ti8": 128,
                "ec_moe_b32": 32, "soft_moe_h32": 32}  # /32: 49 tokens -> at most 32 experts
    assert {n: get_config(n).num_experts for n in expected} == expected


def test_experts_choice_capacity_is_checked_at_config_time():
    with pytest.raises(ValueError, match=r"capacity must be in \[1, tokens per group = 49\], got 0"):
        get_config("ec_moe_s32", num_experts=128)
    with pytest.raises(ValueError, match="capacity_factor"):
        get_config("tc_moe_micro", moe_kwargs={"capacity_factor": -1.0})


def test_micro_models_follow_the_contract():
    for fam, moe in (("vit", None), ("soft_moe", "SoftMoE"), ("tc_moe", "TokensChoiceMoE"),
                     ("ec_moe", "ExpertsChoiceMoE")):
        cfg = create_model(f"{fam}_micro").config
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.img_size, cfg.patch_size, cfg.in_chans) == \
            (64, 4, 2, 256, 32, 4, 3)
        assert cfg.moe_type == moe and cfg.name == f"{fam}_micro"
        assert cfg.moe_blocks == (() if moe is None else (2, 3))
        assert cfg.num_experts == (0 if moe is None else 8)


@pytest.mark.parametrize("name", ["vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro"])
def test_common_overrides_accepted_by_every_model(name, device):
    moe = name != "vit_micro"
    kw = dict(img_size=24, patch_size=6, in_chans=1, num_classes=5)
    if moe:
        kw["num_experts"] = 4
    model = create_model(name, **kw).to(device)
    assert model.patch_embed.num_patches == 16 and model(torch.rand(2, 1, 24, 24, device=device)).shape == (2, 5)
    if moe:
        assert model.blocks[-1].mlp.num_experts == 4
    # None means "not given": keeps the default (argparse-friendly)
    assert create_model(name, img_size=None, num_experts=None).config == get_config(name)


def test_overrides_reach_the_config():
    cfg = get_config("soft_moe_s16", num_experts=256, depth=6, moe_placement="last:2", name="mine")
    assert (cfg.num_experts, cfg.depth, cfg.moe_blocks, cfg.name) == (256, 6, (4, 5), "mine")
    with torch.device("meta"):
        assert create_model("soft_moe_h14", num_experts=256).config.num_experts == 256


def test_switching_moe_on_and_off():
    dense = create_model("soft_moe_micro", moe_type=None)
    assert dense.config.num_experts == 0 and all(type(b.mlp).__name__ == "Mlp" for b in dense.blocks)
    moe = create_model("vit_micro", moe_type="soft", num_experts=2)
    assert type(moe.blocks[-1].mlp).__name__ == "SoftMoE"
    with pytest.raises(ValueError, match="num_experts=4 need a MoE layer type"):
        create_model("vit_micro", num_experts=4)
    assert create_model("vit_micro", num_experts=0).config == get_config("vit_micro")  # legacy: 0 = dense
    # the typed spelling: moe=None is dense, a moe dict on a dense model needs a type
    assert get_config("soft_moe_micro", moe=None) == get_config("soft_moe_micro", moe_type=None)
    assert get_config("vit_micro", moe={"type": "soft", "num_experts": 2}) == moe.config


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model name 'soft_moe_s61'.*soft_moe_s16"):
        create_model("soft_moe_s61")
    with pytest.raises(ValueError, match=r"unknown model name 'vitt_b16'.*vit_b16"):
        get_config("vitt_b16")


def test_unknown_and_bad_overrides():
    with pytest.raises(ValueError, match=r"unknown ViTConfig field 'num_expert'; did you mean 'num_experts' or "
                                         r"'moe.num_experts'"):
        create_model("soft_moe_micro", num_expert=4)
    with pytest.raises(ValueError, match="img_size=30 is not divisible by patch_size=4"):
        create_model("vit_micro", img_size=30)
    with pytest.raises(ValueError, match="in_chans must be an int >= 1, got 0"):
        create_model("vit_micro", in_chans=0)


def test_every_registered_model_builds_on_meta():
    with torch.device("meta"):
        for name in list_models():
            model = create_model(name)
            assert model.config == get_config(name)
            assert all(p.is_meta for p in model.parameters())


def test_register_model_decorator():
    cfg = ViTConfig(embed_dim=32, depth=2, num_heads=2, mlp_dim=64, img_size=16, patch_size=8, name="tiny_test")
    try:
        @register_model(config=cfg)
        def tiny_test(**overrides):
            return build_model(registry.apply_overrides(cfg, overrides))

        @register_model
        def tiny_test_noconfig(**overrides):
            return build_model(registry.apply_overrides(cfg, overrides))

        assert "tiny_test" in list_models() and list_models("tiny_test*") == ["tiny_test", "tiny_test_noconfig"]
        assert create_model("tiny_test", num_classes=3).head.out_features == 3
        assert get_config("tiny_test_noconfig", depth=3).depth == 3  # built on meta to read its config
        with pytest.raises(ValueError, match="already registered"):
            register_model(tiny_test, name="vit_s16")
    finally:
        registry._REGISTRY.pop("tiny_test", None)
        registry._REGISTRY.pop("tiny_test_noconfig", None)
        registry._CONFIGS.pop("tiny_test", None)
