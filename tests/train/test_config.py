"""TrainConfig: --set parsing, errors with suggestions, config files (including the paper recipe).

Pure configuration: no tensor is created, so these run unchanged under any SOFTMOE_TEST_DEVICE."""
import json
from pathlib import Path

import pytest

from softmoe.models.config import parse_overrides
from softmoe.train import ModelConfig, TrainConfig, apply_overrides, available_configs, load_config
from softmoe.train.config import resumable_fields

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_set_parses_by_field_type():
    cfg = apply_overrides(TrainConfig(steps=10), ["lr=3e-4", "batch_size=7", "bf16=true", "img_size=none",
                                                  "data=/some/dir", "head_weight_decay=3", "flip=no"])
    assert cfg.lr == 3e-4 and cfg.batch_size == 7 and cfg.bf16 is True and cfg.img_size is None
    assert cfg.data == "/some/dir" and cfg.head_weight_decay == 3.0 and cfg.flip is False


def test_set_model_section_and_its_old_spelling():
    cfg = apply_overrides(TrainConfig(steps=10), ["model=tc_moe_micro", "model.patch_size=2",
                                                  "model.moe.num_experts=16", "model.moe.k=2",
                                                  "model.moe.placement=[2, 3]"])
    assert cfg.model == ModelConfig("tc_moe_micro", {"patch_size": 2, "moe": {"num_experts": 16, "k": 2,
                                                                              "placement": [2, 3]}})
    vit = cfg.model.vit_config()
    assert (vit.patch_size, vit.moe.num_experts, vit.moe.k, vit.moe_blocks) == (2, 16, 2, (2, 3))
    old = apply_overrides(TrainConfig(steps=10), ["model=tc_moe_micro", "model_kwargs.patch_size=2",
                                                  "model_kwargs.num_experts=16", 'model_kwargs.moe_kwargs={"k": 2}',
                                                  "model_kwargs.moe_placement=[2, 3]"])
    assert old == cfg
    # the one parser: `softmoe info --set` gives the same overrides
    assert parse_overrides(["patch_size=2", "moe.num_experts=16", "moe.k=2", "moe.placement=[2, 3]"]) == \
        cfg.model.overrides
    assert apply_overrides(cfg, ["model.name=vit_micro", "model.moe=none"]).model == \
        ModelConfig("vit_micro", {"patch_size": 2, "moe": None})
    assert apply_overrides(cfg, ['model_kwargs={"depth": 2}']).model == ModelConfig("tc_moe_micro", {"depth": 2})
    assert apply_overrides(cfg, ['model.overrides={}']).model == ModelConfig("tc_moe_micro")


def test_old_config_files_and_saved_configs_still_load():
    """Config files written before ModelConfig passed model= a name and model_kwargs= a dict
    with flat MoE keys; saved config.json files hold the same two keys."""
    old = TrainConfig(model="soft_moe_micro", model_kwargs={"patch_size": 2, "num_experts": 4,
                                                             "moe_kwargs": {"slots_per_expert": 2}}, steps=3)
    new = TrainConfig(model=ModelConfig("soft_moe_micro", {"patch_size": 2, "moe": {"num_experts": 4,
                                                                                    "slots_per_expert": 2}}),
                      steps=3)
    assert old == new
    saved = {**{k: v for k, v in new.to_dict().items() if k != "model"}, "model": "soft_moe_micro",
             "model_kwargs": {"patch_size": 2, "num_experts": 4, "moe_kwargs": {"slots_per_expert": 2},
                              "in_chans": 1}}
    assert TrainConfig.from_dict(saved).model.overrides == {"patch_size": 2, "in_chans": 1,
                                                             "moe": {"num_experts": 4, "slots_per_expert": 2}}


def test_model_section_errors():
    with pytest.raises(ValueError, match="unknown ViTConfig field 'model.patch_sise'; did you mean 'patch_size'"):
        apply_overrides(TrainConfig(steps=1), ["model.patch_sise=2"])
    with pytest.raises(ValueError, match="--set model.moe.k=two: expected int or None"):
        apply_overrides(TrainConfig(steps=1), ["model.moe.k=two"])
    with pytest.raises(ValueError, match="model override depth must be int, got '2'"):
        ModelConfig("vit_micro", {"depth": "2"})
    with pytest.raises(ValueError, match="unknown model config key 'overides'"):
        TrainConfig.from_dict({"model": {"name": "vit_micro", "overides": {}}, "steps": 1})
    with pytest.raises(ValueError, match="'model' must be a registry name or a dict"):
        TrainConfig.from_dict({"model": 3, "steps": 1})
    with pytest.raises(ValueError, match="model name must be a registry name"):
        TrainConfig(model="", steps=1)


def test_resumable_fields_are_marked_on_the_dataclass():
    assert resumable_fields() == {"log_every", "eval_every", "eval_batch_size", "routing_metrics_every",
                                  "checkpoint_every", "keep_checkpoints", "tensorboard", "plots", "workdir",
                                  "num_threads", "device", "reuse_buffers", "ep_size", "dp_replicate",
                                  "dist_timeout_s", "data_parallel", "checkpoint_timeout_s", "checkpoint_async",
                                  "micro_batch_size", "activation_checkpoint",
                                  "compile"}


def test_set_rejects_unknown_keys_with_suggestion():
    with pytest.raises(ValueError, match="unknown config key 'lrr'; did you mean 'lr'"):
        apply_overrides(TrainConfig(steps=1), ["lrr=1"])
    with pytest.raises(ValueError, match="unknown config key 'bach_size'.*'batch_size'"):
        apply_overrides(TrainConfig(steps=1), ["bach_size=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(TrainConfig(steps=1), ["lr"])
    with pytest.raises(ValueError, match="'lr' takes no '.subkey'"):
        apply_overrides(TrainConfig(steps=1), ["lr.x=1"])


def test_set_rejects_wrong_types_and_values():
    with pytest.raises(ValueError, match="--set steps=abc: expected int"):
        apply_overrides(TrainConfig(steps=1), ["steps=abc"])
    with pytest.raises(ValueError, match="--set bf16=maybe: expected bool or None"):
        apply_overrides(TrainConfig(steps=1), ["bf16=maybe"])
    with pytest.raises(ValueError, match="schedule must be one of"):
        apply_overrides(TrainConfig(steps=1), ["schedule=linear"])
    with pytest.raises(ValueError, match=r"data_parallel must be one of \['fsdp', 'ddp'\], got 'zero'"):
        apply_overrides(TrainConfig(steps=1), ["data_parallel=zero"])
    with pytest.raises(ValueError, match="checkpoint_timeout_s"):
        apply_overrides(TrainConfig(steps=1), ["checkpoint_timeout_s=0"])
    with pytest.raises(ValueError, match="dp_replicate must be >= 1, got 0"):
        apply_overrides(TrainConfig(steps=1), ["dp_replicate=0"])
    with pytest.raises(ValueError, match=r"dp_replicate=2 \(HSDP\) needs data_parallel='fsdp', got "
                                         r"data_parallel='ddp'"):
        apply_overrides(TrainConfig(steps=1), ["dp_replicate=2", "data_parallel=ddp"])
    assert apply_overrides(TrainConfig(steps=1), ["dp_replicate=2"]).dp_replicate == 2
    with pytest.raises(ValueError, match="exactly one of steps"):
        apply_overrides(TrainConfig(steps=1), ["epochs=2"])
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        apply_overrides(TrainConfig(steps=1), ["lr=0"])
    with pytest.raises(ValueError, match="'batch_size' must be int"):
        TrainConfig(steps=1, batch_size=2.5).validate()
    with pytest.raises(ValueError, match="--set checkpoint_async=maybe: expected bool"):
        apply_overrides(TrainConfig(steps=1), ["checkpoint_async=maybe"])
    with pytest.raises(ValueError, match="'checkpoint_async' must be bool, got 1"):
        TrainConfig(steps=1, checkpoint_async=1).validate()
    assert apply_overrides(TrainConfig(steps=1), ["checkpoint_async=true"]).checkpoint_async is True
    with pytest.raises(ValueError, match="unknown config key 'optimiser'.*'optimizer'"):
        TrainConfig.from_dict({"optimiser": "adam"})


def test_config_round_trips_through_json():
    cfg = TrainConfig(steps=3, model=ModelConfig("soft_moe_micro", {"moe": {"num_experts": 4}, "depth": 2}))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_every_repo_config_loads():
    names = sorted(p.stem for p in REPO_CONFIGS.glob("*.py"))
    assert {"demo", "debug", "cifar10", "paper_s16"} <= set(names)
    assert set(names) <= set(available_configs())
    for name in names:
        assert isinstance(load_config(name), TrainConfig)
    assert load_config(str(REPO_CONFIGS / "debug.py")) == load_config("debug")


def test_paper_s16_is_the_spec_recipe():
    cfg = load_config("paper_s16")
    assert cfg.model.name == "soft_moe_s16" and cfg.img_size == 224 and cfg.batch_size == 4096
    assert cfg.optimizer == "adamw" and (cfg.beta1, cfg.beta2) == (0.9, 0.999) and cfg.grad_clip == 1.0
    assert cfg.lr == 1e-3 and cfg.weight_decay == 0.03 and cfg.head_weight_decay == 3.0
    assert cfg.schedule == "rsqrt" and cfg.warmup_steps == 10_000 and cfg.rsqrt_timescale == 10_000
    assert cfg.cooldown_steps == 50_000 and cfg.augment == "inception_crop" and cfg.flip
    assert cfg.loss == "sigmoid"


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config 'debgu' not found.*did you mean 'debug'"):
        load_config("debgu")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define a function config"):
        load_config(str(bad))
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def config():\n    return {'lr': 1}\n")
    with pytest.raises(ValueError, match="must return a TrainConfig"):
        load_config(str(wrong))
