"""Char-LM splits and resume: the held-out tail is validation then test (disjoint, contiguous);
a run stopped after a checkpoint and resumed ends bit-exactly where the uninterrupted run ends
(in process, and killed with SIGKILL in a subprocess, as tests/train/test_checkpoint.py does for
the vision trainer); a checkpoint of another run is refused."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from softmoe.lm import CharCorpus
from softmoe.lm.data import encode
from softmoe.train import ModelConfig, TrainConfig, train
from softmoe.train.checkpoint import latest_checkpoint

TINY = dict(block_size=16, embed_dim=16, depth=2, num_heads=2, mlp_dim=32, num_experts=2, slots_per_expert=2,
            chunk_size=4)
TEXT = "".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps over the lazy dog.\n" for i in range(60))


def lm_config(corpus, workdir, **kw):
    base = dict(task="lm", model=ModelConfig("soft_moe_gpt_micro", TINY), data=str(corpus), steps=6, batch_size=4,
                lr=1e-3, schedule="cosine", warmup_steps=2, log_every=1, eval_every=2, checkpoint_every=2,
                eval_batch_size=8, workdir=str(workdir), num_threads=1, seed=3)
    return TrainConfig(**{**base, **kw})


def test_heldout_tail_is_validation_then_test(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    data = encode(TEXT)
    c = CharCorpus.from_spec(str(path), 0.2, 16)
    n_held = int(len(data) * 0.2)
    assert len(c.train) == len(data) - n_held and len(c.val) == n_held // 2 and len(c.test) == n_held - n_held // 2
    assert torch.equal(torch.cat([c.train, c.val, c.test]), data)  # contiguous, disjoint, in order
    for split, part in (("val", c.val), ("test", c.test)):
        w = c.windows(split, 16)
        assert w.shape == ((len(part) - 1) // 16, 17)
        assert torch.equal(w[1], part[16:33])  # non-overlapping windows, each with its next-byte target
    assert torch.equal(c.windows("val", 16, 3), c.val_windows(16, 3))
    with pytest.raises(ValueError, match="split must be one of"):
        c.windows("train", 16)
    (tmp_path / "short.txt").write_text("x" * 200)
    with pytest.raises(ValueError, match="validation and test"):
        CharCorpus.from_spec(str(tmp_path / "short.txt"), 0.1, 16)


def _weights(workdir):
    return load_file(str(workdir / "model" / "model.safetensors"))


def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    full = train(lm_config(corpus, tmp_path / "full"), log=lambda m: None)

    class Stop(Exception):
        pass

    def stop_at_step_4(message):  # logged after step 4's checkpoint is on disk
        if message.startswith("step 4/"):
            raise Stop

    with pytest.raises(Stop):
        train(lm_config(corpus, tmp_path / "b"), log=stop_at_step_4)
    assert latest_checkpoint(tmp_path / "b").name == "step_00000004"
    lines = []
    resumed = train(lm_config(corpus, tmp_path / "b"), log=lines.append)
    assert any(m.startswith("resuming from") and "step 4/6" in m for m in lines)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"] and resumed["resumed_from"] == 4
    for split in ("val", "test"):
        assert resumed["eval"][split]["window_bits_teacher_forced"] == full["eval"][split]["window_bits_teacher_forced"]
    # a checkpoint of another run is refused, naming the field
    with pytest.raises(ValueError, match="different run.*lr"):
        train(lm_config(corpus, tmp_path / "b", lr=2e-3), log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="--resume"):
        train(lm_config(corpus, tmp_path / "empty"), resume=True, log=lambda m: None)


CRASH_CONFIG = """
from softmoe.train import ModelConfig, TrainConfig

def config():
    return TrainConfig(task="lm", model=ModelConfig("soft_moe_gpt_micro", {tiny!r}), data={data!r}, steps=300,
                       batch_size=8, lr=1e-3, schedule="cosine", warmup_steps=10, log_every=50, eval_every=100,
                       checkpoint_every=20, eval_batch_size=16, num_threads=1, seed=5)
"""


def _train_cmd(config, workdir):
    return [sys.executable, "-m", "softmoe", "train", "--config", str(config), "--workdir", str(workdir),
            "--no-progress"]


@pytest.mark.slow
def test_sigkill_and_resume_gives_bitwise_identical_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT * 4)
    config = tmp_path / "crash.py"
    config.write_text(CRASH_CONFIG.format(tiny=TINY, data=str(corpus)))
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(config, tmp_path / "full"), check=True, env=env, capture_output=True, timeout=300)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_train_cmd(config, crashed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(crashed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert latest_checkpoint(crashed) is not None and not (crashed / "metrics.json").exists()
    out = subprocess.run(_train_cmd(config, crashed), check=True, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "resuming from" in out.stdout
    a, b = _weights(tmp_path / "full"), _weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", crashed))
    assert fa["bpc_teacher_forced"] == fb["bpc_teacher_forced"] and fa["history"] == fb["history"]
