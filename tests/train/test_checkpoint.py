"""Checkpoints: atomic layout, retention, loading; and the crash test: a run killed with
SIGKILL after a checkpoint and resumed ends with bitwise the same weights as an
uninterrupted run.

The checkpoint layout tests (files, retention, torn writes) compute nothing and are `cpu_only`
(the trainer tests save and load checkpoints on the device under test); the RNG round trip
covers the `device` under test's generator too (tests/conftest.py); the crash test runs
`softmoe train` subprocesses (`cpu_only`)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from softmoe.models import create_model
from softmoe.train.checkpoint import (checkpoint_dir, latest_checkpoint, list_checkpoints, load_model,
                                      load_train_state, rng_state, save_checkpoint, set_rng_state)


# Checkpoint files and directories only: nothing to compute on a device.
FILE_FORMAT = pytest.mark.cpu_only


def small_model():
    return create_model("soft_moe_micro", img_size=8, patch_size=4, in_chans=1, num_classes=10, depth=2,
                        embed_dim=32, num_heads=2, mlp_dim=64, num_experts=4)


@FILE_FORMAT
def test_save_load_and_retention(tmp_path):
    model = small_model()
    cfg = {"model": "soft_moe_micro", "data": "digits"}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, {"step": step}, cfg, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    assert load_train_state(latest_checkpoint(tmp_path))["step"] == 4
    for path in (tmp_path, checkpoint_dir(tmp_path, 4)):
        loaded, train_cfg = load_model(path)
        assert train_cfg == cfg
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    model.save_pretrained(tmp_path / "plain")
    _, none_cfg = load_model(tmp_path / "plain")
    assert none_cfg is None
    with pytest.raises(FileNotFoundError, match="holds no model"):
        load_model(tmp_path / "checkpoints")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing")


@FILE_FORMAT
def test_incomplete_and_temporary_directories_are_ignored(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path, 5, model, {"step": 5}, {}, keep=3)
    # a crash mid-write leaves a hidden temp dir; a torn directory lacks files
    (tmp_path / "checkpoints" / ".tmp-step_00000009-x").mkdir()
    torn = tmp_path / "checkpoints" / "step_00000007"
    torn.mkdir()
    (torn / "config.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 5)
    save_checkpoint(tmp_path, 6, model, {"step": 6}, {}, keep=3)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # cleaned by the next save
    # re-saving an existing step replaces it
    save_checkpoint(tmp_path, 6, model, {"step": 66}, {}, keep=3)
    assert load_train_state(checkpoint_dir(tmp_path, 6))["step"] == 66


@FILE_FORMAT
def test_failed_write_leaves_no_checkpoint(tmp_path):
    class Unsaveable:
        pass

    # pickling a local class: AttributeError up to Python 3.13, PicklingError from 3.14
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint(tmp_path, 3, small_model(), {"step": 3, "bad": Unsaveable()}, {}, keep=3)
    assert latest_checkpoint(tmp_path) is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir()]


def test_rng_state_round_trip_through_weights_only_load(tmp_path, device):
    import random

    import numpy as np

    torch.rand(1, device=device)  # the device's default generator is in use (CUDA initialised)
    torch.manual_seed(3)  # seeds the CPU and the CUDA generators
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), torch.rand(3, device=device))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn(), torch.rand(3, device=device))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]
    assert torch.equal(expected[4], again[4])  # the device's stream (on the CPU: the same one again)


CRASH_CONFIG = """
from softmoe.train import ModelConfig, TrainConfig

def config():
    return TrainConfig(model=ModelConfig("soft_moe_micro", {"patch_size": 4, "depth": 2, "embed_dim": 32,
                                                            "num_heads": 2, "mlp_dim": 64, "moe": {"num_experts": 4}}),
                       data="digits", augment="crop_flip",
                       steps=400, batch_size=32, lr=1e-3, schedule="cosine", warmup_steps=10,
                       checkpoint_every=25, keep_checkpoints=2, log_every=25, routing_metrics_every=50,
                       tensorboard=False, plots=False, num_threads=1, seed=7)
"""


def _train_cmd(config, workdir):
    return [sys.executable, "-m", "softmoe", "train", "--config", str(config), "--workdir", str(workdir),
            "--no-progress"]


@pytest.mark.slow
@pytest.mark.cpu_only  # subprocesses of `softmoe train` (CPU config)
def test_sigkill_and_resume_gives_bitwise_identical_weights(tmp_path):
    config = tmp_path / "crash.py"
    config.write_text(CRASH_CONFIG)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    # the uninterrupted reference
    subprocess.run(_train_cmd(config, tmp_path / "full"), check=True, env=env, capture_output=True, timeout=300)
    # the same run, killed with SIGKILL once a checkpoint exists
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_train_cmd(config, crashed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while latest_checkpoint(crashed) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = latest_checkpoint(crashed)
    assert killed_at is not None and killed_at.name != "step_00000400"
    out = subprocess.run(_train_cmd(config, crashed), check=True, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "resuming from" in out.stdout
    from safetensors.torch import load_file

    a = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(crashed) / "model.safetensors"))
    assert latest_checkpoint(crashed).name == "step_00000400"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_eval = json.loads((tmp_path / "full" / "summary.json").read_text())["test_accuracy"]
    assert json.loads((crashed / "summary.json").read_text())["test_accuracy"] == full_eval
