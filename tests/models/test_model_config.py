"""The typed model configuration: MoEConfig covers every MoE layer option and passes it to
the layer, options foreign to the layer type are errors, the legacy flat keys mean what they
meant, partial `moe` overrides merge, and the one `--set` parser types every value.

Configuration only: models are built (on the CPU) to read their layers' attributes, nothing is
computed, so these run unchanged under any SOFTMOE_TEST_DEVICE."""
import dataclasses
import inspect
import json

import pytest

from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.models import MoEConfig, ViTConfig, create_model, get_config
from softmoe.models.config import (DERIVED_LAYER_ARGS, OPTION_FIELDS, check_overrides, layer_options,
                                   parse_overrides)

LAYERS = (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE)


def _args(cls):
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", *DERIVED_LAYER_ARGS)]


def test_moe_config_covers_every_layer_option():
    """A constructor argument without a MoEConfig field could not be configured; a field no
    layer takes would be dead."""
    for cls in LAYERS:
        assert set(_args(cls)) <= set(OPTION_FIELDS), cls.__name__
        assert layer_options(cls.__name__) == _args(cls)
    assert set(OPTION_FIELDS) == {a for cls in LAYERS for a in _args(cls)}


@pytest.mark.parametrize("name,moe,attrs", [
    ("soft_moe_micro", dict(slots_per_expert=3, noise_std=0.5, dispatch="uniform", combine="soft", normalize=False,
                            expert_init="distinct", check_finite=True),
     dict(slots_per_expert=3, noise_std=0.5, dispatch="uniform", combine="soft", check_finite=True)),
    ("tc_moe_micro", dict(k=2, capacity_factor=1.5, capacity_multiple_of=2, capacity_rounding="round",
                          batch_priority=False, group_size=2, noise_std=0.25, importance_loss_weight=0.01,
                          load_loss_weight=0.02, gshard_loss_weight=0.03),
     dict(k=2, capacity_factor=1.5, capacity_multiple_of=2, capacity_rounding="round", batch_priority=False,
          group_size=2, noise_std=0.25, importance_loss_weight=0.01, load_loss_weight=0.02, gshard_loss_weight=0.03)),
    ("ec_moe_micro", dict(capacity=3, group_size=2, noise_std=0.0), dict(capacity=3, group_size=2, noise_std=0.0)),
])
def test_every_option_reaches_the_layer(name, moe, attrs):
    model = create_model(name, moe=moe)
    layer = model.blocks[-1].mlp
    for key, value in attrs.items():
        assert getattr(layer, key) == value, key
    if name == "soft_moe_micro":
        assert layer.router.normalize is False and layer.experts.expert_init == "distinct"
    assert model.config.moe == MoEConfig.from_dict({"type": model.config.moe.type, "num_experts": 8, **moe})


def test_unset_options_take_the_layer_defaults():
    layer = create_model("tc_moe_micro").blocks[-1].mlp
    default = TokensChoiceMoE(64, 8, 256)
    for key in _args(TokensChoiceMoE):
        assert getattr(layer, key, None) == getattr(default, key, None), key
    assert get_config("tc_moe_micro").moe.to_dict() == {"type": "TokensChoiceMoE", "num_experts": 8,
                                                        "placement": "last_half"}


def test_legacy_keys_mean_what_they_meant():
    legacy = get_config("tc_moe_micro", num_experts=4, moe_placement=[1, 3], moe_kwargs={"k": 2})
    typed = get_config("tc_moe_micro", moe={"num_experts": 4, "placement": [1, 3], "k": 2})
    assert legacy == typed and legacy.moe_blocks == (1, 3) and legacy.num_experts == 4
    assert get_config("soft_moe_micro", moe_type=None) == get_config("soft_moe_micro", moe=None)
    assert get_config("vit_micro", moe_type="ec", num_experts=2).moe == MoEConfig("ExpertsChoiceMoE", 2)
    # a layer's capacity_multiple_of=None turned the rounding off: it must not become the default 4
    off = get_config("tc_moe_micro", moe_kwargs={"capacity_multiple_of": None})
    assert off.moe.capacity_multiple_of == 1
    tokens = 64
    assert create_model("tc_moe_micro", moe_kwargs={"capacity_multiple_of": None}).blocks[-1].mlp.capacity_for(
        tokens) == TokensChoiceMoE(64, 8, 256, capacity_multiple_of=None).capacity_for(tokens) == 9


def test_moe_overrides_merge_replace_and_drop():
    cfg = get_config("tc_moe_micro", moe={"k": 2})
    merged = cfg.replace(moe={"capacity_factor": 1.5})
    assert (merged.moe.k, merged.moe.capacity_factor, merged.moe.num_experts) == (2, 1.5, 8)
    assert merged.replace(moe={"k": None}).moe.k is None  # None: back to the layer default
    replaced = cfg.replace(moe=MoEConfig("soft", 4))
    assert replaced.moe == MoEConfig("SoftMoE", 4)
    assert cfg.replace(moe=None).moe is None and cfg.replace(moe=None).num_experts == 0
    with pytest.raises(ValueError, match=r"\['k'\] do not apply to SoftMoE"):
        cfg.replace(moe={"type": "soft"})  # k stays set, and Soft MoE has no k
    assert cfg.replace(moe={"type": "soft", "k": None}).moe == MoEConfig("SoftMoE", 8)
    with pytest.raises(ValueError, match="give moe or the legacy keys"):
        cfg.replace(moe=None, num_experts=3)


def test_json_round_trip_and_format():
    cfg = get_config("soft_moe_micro", moe={"slots_per_expert": 2, "placement": [2, 3]})
    d = cfg.to_dict()
    assert d["moe"] == {"type": "SoftMoE", "num_experts": 8, "placement": [2, 3], "slots_per_expert": 2}
    assert ViTConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert ViTConfig.from_dict(get_config("vit_micro").to_dict()).moe is None


@pytest.mark.parametrize("item,expected", [
    ("patch_size=2", {"patch_size": 2}),
    ("layer_norm_eps=1e-5", {"layer_norm_eps": 1e-5}),
    ("qk_norm=false", {"qk_norm": False}),
    ("pool=token", {"pool": "token"}),
    ("moe.num_experts=16", {"moe": {"num_experts": 16}}),
    ("moe.placement=[8, 9]", {"moe": {"placement": [8, 9]}}),
    ("moe.placement=last:2", {"moe": {"placement": "last:2"}}),
    ("moe.capacity_factor=2", {"moe": {"capacity_factor": 2.0}}),
    ("moe.capacity=none", {"moe": {"capacity": None}}),
    ("moe.batch_priority=off", {"moe": {"batch_priority": False}}),
    ("moe.type=tc", {"moe": {"type": "tc"}}),
    ('moe={"k": 2, "type": "tc"}', {"moe": {"k": 2, "type": "tc"}}),
    ("moe=none", {"moe": None}),
    ("moe.type=null", {"moe": None}),
    # legacy spellings
    ("num_experts=256", {"moe": {"num_experts": 256}}),
    ("moe_type=soft", {"moe": {"type": "soft"}}),
    ("moe_type=none", {"moe": None}),
    ("moe_placement=every:2", {"moe": {"placement": "every:2"}}),
    ('moe_kwargs={"slots_per_expert": 2}', {"moe": {"slots_per_expert": 2}}),
    ("moe_kwargs.k=2", {"moe": {"k": 2}}),
])
def test_parse_override_types_each_value(item, expected):
    assert parse_overrides([item]) == expected


def test_parse_overrides_merges_and_builds():
    over = parse_overrides(["num_experts=4", "moe.k=2", "moe.capacity_factor=1.5", "depth=2", "moe.k=1"])
    assert over == {"moe": {"num_experts": 4, "k": 1, "capacity_factor": 1.5}, "depth": 2}
    cfg = get_config("tc_moe_micro", **over)
    assert (cfg.depth, cfg.moe.num_experts, cfg.moe.k, cfg.moe.capacity_factor) == (2, 4, 1, 1.5)
    with pytest.raises(ValueError, match="placement must be .* got '\\[1.5\\]'"):  # text, not a list of ints
        get_config("soft_moe_micro", **parse_overrides(["moe.placement=[1.5]"]))


@pytest.mark.parametrize("item,match", [
    ("depth", "KEY=VALUE"),
    ("num_expert=3", "unknown ViTConfig field 'num_expert'; did you mean 'num_experts' or 'moe.num_experts'"),
    ("moe.slot_per_expert=2", "unknown MoEConfig field 'slot_per_expert'; did you mean 'slots_per_expert'"),
    ("depth=two", "--set depth=two: expected int"),
    ("moe.k=1.5", "--set moe.k=1.5: expected int or None"),
    ("moe.normalize=maybe", "expected bool or None"),
    ("depth.x=1", "'depth' takes no '.subkey'"),
    ("moe.k.x=1", "MoEConfig fields take no '.subkey'"),
    ("moe=[1]", "--set moe=\\[1\\]: expected dict"),
])
def test_parse_override_errors(item, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides([item])


def test_check_overrides_types_without_building():
    assert check_overrides({"num_experts": 4, "patch_size": 2}) == {"moe": {"num_experts": 4}, "patch_size": 2}
    assert check_overrides({"moe": MoEConfig("soft", 2)}) == {"moe": {"type": "SoftMoE", "num_experts": 2,
                                                                      "placement": "last_half"}}
    with pytest.raises(ValueError, match="model override patch_size must be int, got '2'"):
        check_overrides({"patch_size": "2"})
    with pytest.raises(ValueError, match="model override moe.k must be int or None, got 1.5"):
        check_overrides({"moe": {"k": 1.5}})
    with pytest.raises(ValueError, match="did you mean 'patch_size'"):
        check_overrides({"patch_sise": 2})
    with pytest.raises(ValueError, match="must be a dict"):
        check_overrides([("patch_size", 2)])


def test_moe_config_is_a_plain_dataclass():
    names = [f.name for f in dataclasses.fields(MoEConfig)]
    assert names[:3] == ["type", "num_experts", "placement"] and tuple(names[3:]) == OPTION_FIELDS
    with pytest.raises(ValueError, match="'num_experts' must be int"):
        MoEConfig("soft", 2.0)
