"""Char-level LM (softmoe/lm, configs/charlm.py, `softmoe generate`): the two bpc measures agree
for the causal decoder and differ for the leaky canary; a few training steps end to end;
corpora and CLI errors."""
import json

import pytest
import torch

from softmoe.cli import main
from softmoe.lm import CharCorpus, bpc_prefix_only, bpc_teacher_forced, load_corpus
from softmoe.models.gpt import create_decoder
from softmoe.train import ModelConfig, TrainConfig, train

TINY = dict(block_size=16, embed_dim=16, depth=2, num_heads=2, mlp_dim=32, num_experts=2, slots_per_expert=2)
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def windows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 17), generator=g)


def test_bpc_equal_both_ways_for_the_causal_decoder():
    for name in ("gpt_micro", "soft_moe_gpt_micro"):
        torch.manual_seed(0)
        model = create_decoder(name, **TINY, chunk_size=5).eval()
        w = windows()
        # float32 sums of 48 cross-entropies in two orders: ~1e-6 bits
        assert abs(bpc_teacher_forced(model, w) - bpc_prefix_only(model, w)) < 1e-4


def test_leaky_soft_moe_canary_shows_a_gap():
    # The plain SoftMoE lets the window's future into every position: the two measures differ by
    # ~0.02 bits even untrained (0.0247 measured), 200x the causal models' rounding bound above.
    torch.manual_seed(0)
    model = create_decoder("gpt_micro", **TINY, moe_type="SoftMoE").eval()
    w = windows()
    assert abs(bpc_teacher_forced(model, w) - bpc_prefix_only(model, w)) > 0.01


def test_corpora(tmp_path):
    assert len(load_corpus("pydoc")) > 400_000
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("def")
    (tmp_path / "skip.bin").write_bytes(b"zz")
    assert load_corpus(str(tmp_path)) == "abc\n\ndef"
    assert load_corpus(str(tmp_path / "a.txt")) == "abc"
    with pytest.raises(FileNotFoundError, match="corpus"):
        load_corpus(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="too short"):
        CharCorpus.from_spec(str(tmp_path / "a.txt"), 0.1, 16)
    corpus = CharCorpus.from_spec("pydoc", 0.1, 16)
    x, y = corpus.batch(4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert corpus.val_windows(16, 5).shape == (5, 17)


def test_train_a_few_steps_then_generate(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = TrainConfig(task="lm", model=ModelConfig("soft_moe_gpt_micro", {**TINY, "chunk_size": 8}),
                      data=str(corpus), steps=3, batch_size=4, lr=1e-3, schedule="cosine", log_every=1,
                      eval_batch_size=8, workdir=str(tmp_path / "run"))
    summary = train(cfg, log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["steps"] == 3 and abs(saved["leak_gap_bpc"]) < 1e-4 and saved["train_tokens_per_s"] > 0
    assert summary["bpc_teacher_forced"] == saved["bpc_teacher_forced"]
    assert main(["generate", str(tmp_path / "run"), "--prompt", "The q", "--tokens", "7", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The q") and len(out.encode("utf-8", errors="replace")) >= len("The q") + 1


def test_cli_errors(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--tokens", "3"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--tokens", "-1"]) == 2
    assert "--tokens" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        ModelConfig("gpt_micro", {"patch_size": 4})
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="seq2seq", steps=1).validate()


@pytest.mark.parametrize("field,value", [("micro_batch_size", 4), ("activation_checkpoint", "full"),
                                         ("compile", True), ("checkpoint_async", True), ("ep_size", 2),
                                         ("dp_replicate", 2)])
def test_lm_rejects_the_vision_trainers_options(field, value):
    """The char-LM loop trains in one process, unaccumulated, eager, saving synchronously: each
    option it would ignore is a ValueError naming it and its value, never a silent no-op."""
    with pytest.raises(ValueError, match=f"task='classify' only .*got {field}={value!r}"):
        TrainConfig(task="lm", model="gpt_micro", data="pydoc", steps=1, **{field: value}).validate()


def test_lm_under_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE > 1 (torchrun): every rank would train the same model into one work directory;
    `softmoe train` exits 2 naming it before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "charlm", "--workdir", str(tmp_path / "w"), "--set", "steps=1"]) == 2
    assert "task='lm' trains in one process; run `softmoe train` without torchrun (WORLD_SIZE=2)" \
        in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
