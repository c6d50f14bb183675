"""The decoder zoo in the shared registry: listed under task "lm" (never among the vision models,
so timm registration skips them), built by create_model, counted by the profiler (checked against
FlopCounterMode and the modules), saved and loaded by softmoe.models' save_pretrained /
from_pretrained bit-exactly.

The save/load round trip is device-agnostic (tests/conftest.py: saved from and loaded onto the
`device` under test, forwards there). The FLOP-counter comparison is `cpu_only`; listing,
configs and the CLI compute nothing."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from softmoe.cli import main
from softmoe.models import create_model, from_pretrained, get_config, list_models, profile_model, save_pretrained
from softmoe.models.gpt import GPT, GPTConfig
from softmoe.models.profile import count_params, gpt_flop_breakdown
from softmoe.models.registry import model_task

DECODERS = ["gpt_micro", "soft_moe_gpt_micro"]


def test_listed_by_task():
    assert list_models(task="lm") == DECODERS
    assert not set(DECODERS) & set(list_models())  # the default: vision models only
    assert list_models("*_micro") == ["vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro"]
    assert set(list_models(task=None)) == set(list_models()) | set(DECODERS)
    assert model_task("gpt_micro") == "lm" and model_task("vit_micro") == "classify"
    with pytest.raises(ValueError, match="task must be one of"):
        list_models(task="vision")


def test_create_model_and_get_config():
    model = create_model("soft_moe_gpt_micro", num_experts=2, chunk_size=4)
    assert isinstance(model, GPT) and model.config.num_experts == 2
    cfg = get_config("soft_moe_gpt_micro", chunk_size=None)  # None keeps the default, as for the ViTs
    assert isinstance(cfg, GPTConfig) and cfg == get_config("soft_moe_gpt_micro")
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        create_model("gpt_micro", patch_size=4)
    with pytest.raises(ValueError, match="did you mean"):
        create_model("gpt_mikro")


def attention_mix_by_hand(cfg, T):
    return cfg.depth * 2 * (2 * T * T * cfg.embed_dim)  # q k^T and attn @ v, summed over heads


@pytest.mark.parametrize("name,overrides", [
    ("gpt_micro", {}),
    ("gpt_micro", {"tie_head": False, "depth": 3}),
    ("soft_moe_gpt_micro", {}),
    ("soft_moe_gpt_micro", {"chunk_size": 6}),  # T = 128 is not a multiple of C: padded chunks
    ("soft_moe_gpt_micro", {"num_experts": 2, "slots_per_expert": 2, "chunk_size": 5, "block_size": 23}),
    ("soft_moe_gpt_micro", {"moe_type": "SoftMoE"}),  # the leak canary
])
@pytest.mark.cpu_only  # relies on FlopCounterMode leaving the CPU SDPA kernel uncounted (CUDA's are counted)
def test_profiler_equals_flop_counter_and_modules(name, overrides):
    model = create_model(name, **overrides).eval()
    cfg = model.config
    prof = profile_model(name, **overrides)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, cfg.block_size, dtype=torch.int64))
    # FlopCounterMode does not count scaled_dot_product_attention on the CPU; everything else matches exactly
    assert prof.flop_breakdown["attention_mix"] == attention_mix_by_hand(cfg, cfg.block_size)
    assert prof.flops - prof.flop_breakdown["attention_mix"] == counter.get_total_flops()
    assert prof.params == sum(p.numel() for p in model.parameters()) == count_params(cfg)
    assert prof.task == "lm"


def test_slots_equal_tokens_cost_the_dense_mlp():
    dense, moe = (gpt_flop_breakdown(get_config(n)) for n in DECODERS)
    assert moe["moe_experts"] == dense["mlp"] // 2  # 2 of the 4 blocks are MoE: S = C, one expert pass per token
    assert sum(moe.values()) / sum(dense.values()) == pytest.approx(1.00735, abs=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_through_softmoe_models(tmp_path, tie, device):
    torch.manual_seed(0)
    model = create_model("soft_moe_gpt_micro", tie_head=tie, chunk_size=8).eval().to(device)
    save_pretrained(model, tmp_path / "a")
    model.save_pretrained(tmp_path / "b")  # the method writes the same files
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    loaded = from_pretrained(tmp_path / "a", device=device).eval()
    assert isinstance(loaded, GPT) and loaded.config == model.config
    assert (loaded.head.weight is loaded.tok_emb.weight) == tie
    sd, sl = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sl.keys() and all(torch.equal(sd[k], sl[k]) for k in sd)
    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator(device=device).manual_seed(1), device=device)
    assert torch.equal(model(idx), loaded(idx))
    with pytest.raises(ValueError, match="no config overrides"):
        from_pretrained(tmp_path / "a", num_classes=3)


def test_models_and_info_cli(capsys):
    assert main(["models", "*gpt*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("decoders (task lm") and lines[1].split()[:4] == ["name", "params", "GFLOP/seq", "ctx"]
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["gpt_micro"][1:4] == ["224.6K", "0.0713", "128"]
    assert rows["soft_moe_gpt_micro"][1:] == ["423.7K", "0.0718", "128", "2", "4", "CausalSoftMoE"]
    assert main(["info", "soft_moe_gpt_micro", "--set", "chunk_size=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("soft_moe_gpt_micro: 423.7K parameters") and "chunk_size=8" in out


def test_timm_registration_stays_vision_only():
    pytest.importorskip("timm")
    from softmoe.models import register_timm_models

    names = register_timm_models("*micro")
    assert "vit_micro" in names and not set(DECODERS) & set(names)
