"""Router noise keyed by global row and sharded evaluation under torch.distributed (gloo, CPU,
one thread per process; docs/distributed.md "Router noise" and "Sharded evaluation").

- Noisy Tokens Choice, Experts Choice and Soft MoE (noise_std > 0) trained with `softmoe train`
  at DP2 and EP2 end at the single-process weights (float32, 1e-5), and their sharded final
  evaluation gives the single process's accuracy (exactly) and loss.
- `evaluate` sharded over 2 and 3 ranks (3 does not divide the 10 batches): the one-process
  numbers, bitwise under data parallelism, and under expert parallelism at ep = world (every
  rank runs the same number of same-shape passes, padding included, or it would hang).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softmoe.distributed.launch import run_processes
from softmoe.models.hub import load_model

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("noise_eval_scenarios.py")
TOL = 1e-5  # float32 weights after 4 AdamW steps: reduction order (all-to-all, gradient all-reduce) only
COMMON = ["--set", "batch_size=16", "--set", "num_threads=1", "--set", "tensorboard=false", "--set", "plots=false",
          "--set", "log_every=2", "--set", "routing_metrics_every=0", "--set", "dist_timeout_s=20",
          "--set", "eval_batch_size=64", "--set", "steps=4", "--no-progress"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(workdir: Path, extra, nproc: int = 1, ep: int = 1, timeout_s: float = 180) -> str:
    args = ["-m", "softmoe", "train", "--workdir", str(workdir), "--set", f"ep_size={ep}", *COMMON, *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(_port()), *args]
    p = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout_s)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def max_diff(a: Path, b: Path) -> float:
    # a single-process checkpoint (model.safetensors) or a parallel run's DCP directory, read alike
    wa, wb = (load_model(w / "checkpoints" / "step_00000004")[0].state_dict() for w in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)


NOISY = {"tokens_choice": ["--set", "model=tc_moe_micro"],  # the sparse layers' default noise_std is 1.0
         "experts_choice": ["--set", "model=ec_moe_micro"],
         "soft_moe": ["--set", "model=soft_moe_micro", "--set", "model.moe.noise_std=0.5"]}


@pytest.mark.parametrize("kind", sorted(NOISY))
def test_noisy_router_training_equals_one_process(kind, tmp_path):
    """Without keyed noise every rank draws the same noise for different rows: Tokens Choice
    and Experts Choice differed from one process by 3.8e-3 / 2.0e-3 after 4 steps. Tokens
    Choice also resumes the single-process step-2 checkpoint at EP2 and ends at its weights."""
    extra = NOISY[kind]
    train(tmp_path / "single", [*extra, "--set", "checkpoint_every=2", "--set", "keep_checkpoints=5"])
    single = json.loads((tmp_path / "single" / "summary.json").read_text())
    for name, nproc, ep in (("dp2", 2, 1), ("ep2", 2, 2)):
        wd = tmp_path / name
        train(wd, extra, nproc, ep)
        diff = max_diff(wd, tmp_path / "single")
        assert 0 < diff < TOL, (name, diff)  # > 0: a real parallel run, not the single-process path
        got = json.loads((wd / "summary.json").read_text())  # the final evaluation, sharded over 2 ranks
        assert got["test_accuracy"] == single["test_accuracy"], name
        assert got["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5), name
    if kind == "tokens_choice":  # the RNG advanced as in one process: its checkpoint resumes the same noise at EP2
        wd = tmp_path / "resumed"
        shutil.copytree(tmp_path / "single", wd)
        shutil.rmtree(wd / "checkpoints" / "step_00000004")
        assert "resuming from" in train(wd, extra, 2, 2)
        assert max_diff(wd, tmp_path / "single") < TOL


def launch(scenario: str, world: int, tmp: Path, timeout_s: float = 150, collective_timeout_s: float = 60):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    store = tmp / f"store-{scenario}-{world}-{time.monotonic_ns()}"
    logs = [open(tmp / f"{scenario}-{world}-rank{r}.log", "w+") for r in range(world)]
    commands = [[sys.executable, str(WORKER), scenario, str(r), str(world), str(store), str(tmp),
                 str(collective_timeout_s)] for r in range(world)]
    codes = run_processes(commands, [env] * world, timeout_s, 20, outputs=logs)
    out = []
    for code, log in zip(codes, logs):
        log.seek(0)
        out.append((code, log.read()))
        log.close()
    for rank, (rc, text) in enumerate(out):
        assert rc == 0, f"rank {rank} exited {rc}:\n{text[-4000:]}"
    return out[0][1]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_evaluation_equals_one_process(world, tmp_path):
    assert f"ok sharded eval world={world}" in launch("eval", world, tmp_path)
