"""The decoder zoo (softmoe/models/gpt.py): causal end to end, KV-cache decoding = the parallel
forward, the leaky canary, checkpoints round-trip bit-exactly."""
import pytest
import torch

from softmoe.models.gpt import GPT, create_decoder, from_pretrained, get_decoder_config, list_decoders, save_pretrained

TINY = dict(block_size=24, embed_dim=16, depth=2, num_heads=2, mlp_dim=32, num_experts=2, slots_per_expert=2,
            chunk_size=5)


def tiny(name="soft_moe_gpt_micro", device="cpu", **kw):
    """A tiny decoder on `device` (the tests pass the `device` fixture, tests/conftest.py)."""
    torch.manual_seed(0)
    return create_decoder(name, **(TINY | kw)).eval().to(device)


def test_zoo_table():
    assert list_decoders() == ["gpt_micro", "soft_moe_gpt_micro"]
    assert get_decoder_config("gpt_micro").moe_blocks == ()
    assert get_decoder_config("soft_moe_gpt_micro").moe_blocks == (2, 3)  # the last half of 4 blocks
    with pytest.raises(ValueError, match="unknown decoder"):
        create_decoder("gpt_huge")
    with pytest.raises(ValueError, match="moe_type"):
        create_decoder("gpt_micro", moe_type="TokensChoiceMoE")
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        create_decoder("gpt_micro", img_size=3)


@pytest.mark.parametrize("name", ["gpt_micro", "soft_moe_gpt_micro"])
def test_past_logits_bit_identical_when_future_changes(name, device):
    model = tiny(name, device)
    idx = torch.randint(0, 256, (2, 17), device=device)
    ref = model(idx)
    for t in (0, 4, 5, 11):
        idx2 = idx.clone()
        idx2[:, t + 1:] = torch.randint(0, 256, (2, 16 - t), device=device)
        assert torch.equal(model(idx2)[:, :t + 1], ref[:, :t + 1])


def test_plain_soft_moe_decoder_leaks(device):
    # The canary: a plain SoftMoE in a causal-attention decoder lets the future into past logits.
    model = tiny("gpt_micro", device, moe_type="SoftMoE")
    idx = torch.randint(0, 256, (2, 17), device=device)
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 1) % 256
    assert (model(idx2)[:, :10] - model(idx)[:, :10]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="not causal"):
        model.step(idx[:, 0], model.init_cache(2))


@pytest.mark.parametrize("name,tie", [("gpt_micro", True), ("soft_moe_gpt_micro", True),
                                      ("soft_moe_gpt_micro", False)])
def test_cached_decoding_equals_parallel_forward(name, tie, device):
    model = tiny(name, device, tie_head=tie)
    idx = torch.randint(0, 256, (3, 23), device=device)  # 23 = 4 full chunks of 5 + 3
    ref = model(idx)
    cache = model.init_cache(3)
    steps = torch.stack([model.step(idx[:, t], cache) for t in range(23)], 1)
    torch.testing.assert_close(steps, ref, rtol=0, atol=1e-5)  # float32 rounding of two orders of sums


def test_generate_is_bounded_and_deterministic_when_greedy(device):
    model = tiny(device=device)
    prompt = torch.randint(0, 256, (2, 4), device=device)
    out = model.generate(prompt, 40, temperature=0)  # past block_size=24: the cache restarts
    assert out.shape == (2, 44) and torch.equal(out[:, :4], prompt)
    assert torch.equal(model.generate(prompt, 40, temperature=0), out)
    with pytest.raises(ValueError, match="idx"):
        model.generate(prompt.float(), 3)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie, device):
    model = tiny(device=device, tie_head=tie)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt").eval().to(device)
    assert isinstance(loaded, GPT) and loaded.config == model.config
    assert (loaded.head.weight is loaded.tok_emb.weight) == tie
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    idx = torch.randint(0, 256, (2, 9), device=device)
    assert torch.equal(loaded(idx), model(idx))
    with pytest.raises(ValueError, match="checkpoint"):
        from_pretrained(tmp_path / "missing")
