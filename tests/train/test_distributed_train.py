"""`softmoe train` under torchrun (softmoe/train/parallel.py, docs/distributed.md): EP and DP x EP
runs equal the single-process run, checkpoints move between layouts, a dead rank stops the others,
bad launches exit 2 with a clear message. gloo on CPU, one thread per process, a few steps."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.cpu_only]  # gloo on CPU, torchrun subprocesses

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--set", "batch_size=16", "--set", "num_threads=1", "--set", "tensorboard=false", "--set", "plots=false",
          "--set", "log_every=2", "--set", "routing_metrics_every=0", "--set", "dist_timeout_s=20", "--no-progress"]
TOL = 1e-5  # float reduction order (all-to-all, gradient all-reduce) only


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return dict(env, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(workdir: Path, steps: int, nproc: int = 1, ep: int = 1, extra=(), timeout_s: float = 120):
    """`softmoe train` (under torchrun when nproc > 1); returns (returncode, output)."""
    args = ["-m", "softmoe", "train", "--workdir", str(workdir), "--set", f"steps={steps}",
            "--set", f"ep_size={ep}", *COMMON, *extra]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
                "--master-port", str(_port()), *args]
    p = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout_s)
    return p.returncode, p.stdout + p.stderr


def ok(result):
    rc, out = result
    assert rc == 0, out[-4000:]
    return out


def weights(workdir: Path, step: int) -> dict:
    """The weights of checkpoint `step`: a single-process run's model.safetensors, or a parallel
    run's DCP shards read in this process (what `softmoe eval` and `softmoe export` read)."""
    ckpt = workdir / "checkpoints" / f"step_{step:08d}"
    if (ckpt / "model.safetensors").is_file():
        return load_file(str(ckpt / "model.safetensors"))
    from softmoe.models.hub import from_dcp

    return {k: v.detach() for k, v in from_dcp(ckpt).state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process reference: 6 steps, a checkpoint every 2."""
    wd = tmp_path_factory.mktemp("single")
    ok(train(wd, 6, extra=["--set", "checkpoint_every=2", "--set", "keep_checkpoints=5"]))
    return wd


@pytest.mark.parametrize("nproc,ep,engine,replicate", [(2, 2, "fsdp", 1), (4, 2, "fsdp", 1), (2, 2, "ddp", 1),
                                                       (4, 2, "fsdp", 2)])
def test_parallel_run_equals_single_process(single, tmp_path, nproc, ep, engine, replicate):
    """FSDP2 (the default) and DDP (experts replicated over dp) at EP=2 equal one process, and
    so does HSDP (`dp_replicate=2` on 4 ranks: dp_replicate 2 x dp_shard 1 x ep 2)."""
    out = ok(train(tmp_path, 6, nproc, ep, extra=["--set", f"data_parallel={engine}",
                                                  "--set", f"dp_replicate={replicate}"]))
    assert json.loads((tmp_path / "config.json").read_text())["dp_replicate"] == replicate
    assert out.count("summary:") == 1  # rank 0 alone prints
    diff = max_diff(weights(tmp_path, 6), weights(single, 6))
    assert diff < TOL, diff
    assert diff > 0 or nproc == 1  # a real parallel run, not the single-process path
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines))  # one writer


@pytest.mark.parametrize("nproc,replicate,engine,micro,checkpointing", [
    (2, 1, "fsdp", 4, "none"), (2, 1, "fsdp", 2, "selective"), (2, 1, "ddp", 4, "full"),
    (4, 2, "fsdp", 2, "selective")])
def test_accumulation_and_checkpointing_equal_single_process(single, tmp_path, nproc, replicate, engine, micro,
                                                             checkpointing):
    """At EP=2 on 2 ranks (8 rows each), micro-batches of 4 or 2 rows (k = 2, 4; FSDP2 skips its
    reduce-scatter, DDP its all-reduce, on all but the last) and activation checkpointing give
    the single process's weights without accumulation (float reduction order: TOL); and so does
    HSDP (4 ranks, dp_replicate 2 x ep 2, 4 rows each in 2 micro-batches: no reduce-scatter or
    all-reduce across replicas but on the last)."""
    extra = ["--set", f"data_parallel={engine}", "--set", f"micro_batch_size={micro}",
             "--set", f"activation_checkpoint={checkpointing}", "--set", f"dp_replicate={replicate}"]
    ok(train(tmp_path, 6, nproc, 2, extra=extra))
    diff = max_diff(weights(tmp_path, 6), weights(single, 6))
    assert 0 < diff < TOL, diff
    logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    want = [r for r in map(json.loads, (single / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [r["accuracy"] for r in logged] == [r["accuracy"] for r in want]  # the global batch's
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(logged, want, strict=True)) < 1e-6


def test_noisy_tokens_choice_with_accumulation_equals_one_process(tmp_path):
    """Noisy Tokens Choice (noise_std 1.0): 2 ranks at EP=2, micro-batches of 2 rows (k = 4) with
    full checkpointing: each micro-batch draws its rows of the one-process noise; the weights
    after 4 steps are those of one process without accumulation."""
    tc = ["--set", "model=tc_moe_micro"]
    ok(train(tmp_path / "single", 4, extra=tc))
    ok(train(tmp_path / "acc", 4, 2, 2, extra=[*tc, "--set", "micro_batch_size=2",
                                                "--set", "activation_checkpoint=full"]))
    diff = max_diff(weights(tmp_path / "acc", 4), weights(tmp_path / "single", 4))
    assert 0 < diff < TOL, diff


def rewind(workdir: Path, step: int) -> None:
    """Delete the checkpoints after `step`: the next `softmoe train` resumes at `step`."""
    for d in (workdir / "checkpoints").glob("step_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)


EVERY2 = ["--set", "checkpoint_every=2", "--set", "keep_checkpoints=5"]


def test_checkpoint_moves_between_layouts(single, tmp_path):
    """EP=4 (4 ranks) -> EP=2 (2 ranks) -> one process, and one process -> DP=2: each session
    resumes the previous one's checkpoint and ends at the single-process weights."""
    wd = tmp_path / "down"
    ok(train(wd, 6, 4, 4, extra=EVERY2))
    assert (wd / "checkpoints" / "step_00000002" / "dcp" / "COMPLETE").is_file()
    assert not (wd / "checkpoints" / "step_00000002" / "model.safetensors").exists()  # nothing whole in the job
    assert max_diff(weights(wd, 2), weights(single, 2)) < TOL
    from softmoe.cli import main  # `softmoe export` of the 4-rank DCP checkpoint: the single-process weights

    assert main(["export", str(wd / "checkpoints" / "step_00000002"), str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert any(t.dim() == 0 for t in exported.values())  # router.scale, 0-dim, exported too
    assert max_diff(exported, weights(single, 2)) < TOL
    rewind(wd, 2)
    assert "resuming from" in ok(train(wd, 6, 2, 2, extra=EVERY2))
    assert max_diff(weights(wd, 6), weights(single, 6)) < TOL
    rewind(wd, 4)
    assert "resuming from" in ok(train(wd, 6, extra=EVERY2))
    assert max_diff(weights(wd, 6), weights(single, 6)) < TOL
    up = tmp_path / "up"
    shutil.copytree(single, up)
    rewind(up, 2)
    assert "resuming from" in ok(train(up, 6, 2, 1, extra=EVERY2))
    assert max_diff(weights(up, 6), weights(single, 6)) < TOL
    from softmoe.models.hub import load_model  # what softmoe eval reads: a parallel run's checkpoint
    model, cfg = load_model(wd)
    ref, _ = load_model(single)
    got, want = model.state_dict(), ref.state_dict()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < TOL


@pytest.mark.parametrize("nproc,ep", [(2, 2), (4, 4)])
def test_single_process_checkpoint_resumes_expert_parallel(single, tmp_path, nproc, ep):
    """One process -> EP=2 / EP=4: the single-file checkpoint's weights and Adam moments are cut
    to each rank's experts, and the run ends at the single-process weights and optimizer state."""
    import softmoe.distributed as smd
    from softmoe.models.hub import load_model
    from softmoe.train import TrainConfig
    from softmoe.train.checkpoint import load_train_state, read_run_config
    from softmoe.train.optim import build_optimizer

    wd = tmp_path / "w"
    shutil.copytree(single, wd)
    rewind(wd, 4)  # by step 4 the experts' Adam moments are non-zero and differ between experts
    assert "resuming from" in ok(train(wd, 6, nproc, ep, extra=EVERY2))
    assert max_diff(weights(wd, 6), weights(single, 6)) < TOL
    # The sharded step-6 optimizer state, read back in one process, is the single-process run's.
    step6 = wd / "checkpoints" / "step_00000006"
    model, _ = load_model(step6)
    opt = build_optimizer(model, TrainConfig.from_dict(read_run_config(wd / "config.json")))
    smd.load_checkpoint(step6 / "dcp", model, opt)
    want = load_train_state(single / "checkpoints" / "step_00000006")["optimizer"]["state"]
    got = opt.state_dict()["state"]
    assert got.keys() == want.keys()
    for i in want:
        for k, w in want[i].items():
            if torch.is_tensor(w) and w.dim():  # relative: the moments are ~1e-6 here
                err = (got[i][k].double() - w.double()).abs().max().item()
                assert err <= 1e-3 * w.abs().max().item() + 1e-12, (i, k, err, w.abs().max().item())


def _launch_ranks(workdir: Path, steps: int, world: int, ep: int, log_dir: Path, extra=()):
    """`softmoe train` on `world` processes started here (no torchrun: a rank killed here is not
    restarted and the others are left to fail on their own), a checkpoint every step."""
    port = _port()
    procs = []
    for r in range(world):
        env = _env(WORLD_SIZE=str(world), RANK=str(r), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "softmoe", "train", "--workdir", str(workdir), "--set", f"steps={steps}",
               "--set", f"ep_size={ep}", "--set", "checkpoint_every=1", *COMMON, *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=open(log_dir / f"rank{r}.log", "w"),
                                      stderr=subprocess.STDOUT))
    return procs


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The uninterrupted 2-rank EP=2 reference: 8 steps, a (synchronous) checkpoint every 2."""
    wd = tmp_path_factory.mktemp("two_ranks")
    ok(train(wd, 8, 2, 2, extra=EVERY2))
    return wd


def test_sigkill_of_one_rank_stops_the_other_then_resume_is_bitwise(two_ranks, tmp_path):
    ref = two_ranks
    wd = tmp_path / "killed"
    procs = _launch_ranks(wd, 8, 2, 2, tmp_path)
    try:
        deadline = time.monotonic() + 90
        while not (wd / "checkpoints" / "step_00000003").is_dir() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "rank0.log").read_text()
            time.sleep(0.02)
        os.kill(procs[1].pid, signal.SIGKILL)
        rc0 = procs[0].wait(timeout=60)  # the collective timeout (20 s) bounds the wait
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc0 != 0, (tmp_path / "rank0.log").read_text()
    assert not list((wd / "checkpoints").glob("step_00000008"))
    out = ok(train(wd, 8, 2, 2))
    assert "resuming from" in out
    a, b = weights(wd, 8), weights(ref, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_sigkill_mid_save_keeps_the_previous_checkpoint_and_resumes_at_any_layout(two_ranks, tmp_path, asynchronous):
    """Rank 0 (the rank that renames a finished save into place) is killed while the DCP shards
    of step 4 are being written (.tmp-step_00000004-parallel/dcp/ exists; that phase lasts
    0.3-0.6 s for this model on 2 loaded cores, its start is polled every 1 ms): rank 1 fails on
    its own within the checkpoint timeout (20 s here), no step_00000004 appears, step 3 is
    intact and resumes: at 2 ranks bitwise the uninterrupted run, in one process within TOL
    (the cross-layout tolerance), rank 0's RNG states taken by the one process (logged). With
    checkpoint_async the same, the kill landing while the shards are written in the background
    (training goes on meanwhile) or before the save is finished at step 5 (then resumed at 2
    ranks only)."""
    wd = tmp_path / "killed"
    ckpts = wd / "checkpoints"
    saving = ckpts / ".tmp-step_00000004-parallel"
    procs = _launch_ranks(wd, 8, 2, 2, tmp_path, extra=["--set", "checkpoint_timeout_s=20",
                                                        "--set", f"checkpoint_async={str(asynchronous).lower()}"])
    try:
        deadline = time.monotonic() + 120
        while not (saving / "dcp").is_dir():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
                (tmp_path / "rank0.log").read_text()
            time.sleep(0.001)
        os.kill(procs[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        rc1 = procs[1].wait(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    log1 = (tmp_path / "rank1.log").read_text()
    assert rc1 != 0 and waited < 45, (rc1, waited, log1[-3000:])
    assert not (ckpts / "step_00000004").exists() and not list(ckpts.glob("step_0000000[5-8]"))
    assert saving.is_dir() and not (saving / "dcp" / "COMPLETE").exists()  # it was killed mid-save
    assert (ckpts / "step_00000003" / "dcp" / "COMPLETE").is_file()
    assert sorted(p.name for p in (ckpts / "step_00000003" / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    a, b = weights(wd, 2), weights(two_ranks, 2)  # a checkpoint before the kill: the reference's, bitwise
    assert all(torch.equal(a[k], b[k]) for k in b)
    one = tmp_path / "one"
    shutil.copytree(wd, one)
    out = ok(train(wd, 8, 2, 2))
    assert f"resuming from {ckpts / 'step_00000003'}" in out
    assert not list(ckpts.glob(".tmp-*"))  # the interrupted save's directory: removed by the next save
    a, b = weights(wd, 8), weights(two_ranks, 8)
    assert all(torch.equal(a[k], b[k]) for k in b)
    if asynchronous:
        return
    out = ok(train(one, 8))
    assert "resuming from" in out and "RNG states of 2 ranks and this run has 1" in out
    assert max_diff(weights(one, 8), weights(two_ranks, 8)) < TOL


def _contents(workdir: Path, step: int):
    """Checkpoint `step` of a parallel run read in this process: (weights, optimizer state_dict,
    every rank's RNG file, train_state.pt without its train_config)."""
    import softmoe.distributed as smd
    from softmoe.models.hub import load_model
    from softmoe.train import TrainConfig
    from softmoe.train.checkpoint import load_state_file, load_train_state, read_run_config
    from softmoe.train.optim import build_optimizer
    from softmoe.train.parallel import rng_file

    ckpt = workdir / "checkpoints" / f"step_{step:08d}"
    model, _ = load_model(ckpt)
    opt = build_optimizer(model, TrainConfig.from_dict(read_run_config(workdir / "config.json")))
    smd.load_checkpoint(ckpt / "dcp", model, opt)
    state = load_train_state(ckpt)
    state.pop("train_config")  # holds checkpoint_async itself
    rngs = [load_state_file(ckpt / rng_file(r), "RNG state") for r in range(state["rng_ranks"])]
    return model.state_dict(), opt.state_dict(), rngs, state


def assert_identical(a, b, where=""):
    """Nested dicts / lists / tensors / numbers equal exactly (tensors: dtype, shape, bits)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_async_checkpoints_equal_the_synchronous_ones_and_resume_bitwise(two_ranks, tmp_path):
    """checkpoint_async=true at EP=2 on 2 ranks: every checkpoint (steps 2, 4, 6, 8) holds the
    synchronous run's weights, optimizer state, per-rank RNG states and train state bitwise;
    resumed from step 4 (asynchronously again) it ends at the uninterrupted run's weights."""
    wd = tmp_path / "async"
    ok(train(wd, 8, 2, 2, extra=[*EVERY2, "--set", "checkpoint_async=true"]))
    for step in (2, 4, 6, 8):
        assert_identical(_contents(wd, step), _contents(two_ranks, step), f"step {step}")
    assert not list((wd / "checkpoints").glob(".tmp-*"))
    rewind(wd, 4)
    out = ok(train(wd, 8, 2, 2, extra=[*EVERY2, "--set", "checkpoint_async=true"]))
    assert "resuming from" in out
    assert_identical(_contents(wd, 8), _contents(two_ranks, 8), "resumed step 8")


def test_divergence_finishes_the_async_save_in_flight_before_it_exits(tmp_path):
    """lr 1e30 at EP=2 on 2 ranks with checkpoint_async and a checkpoint every step: the run
    diverges at some step s (every rank alike: the loss is all-reduced); the save of step s - 1,
    still in flight, is finished first, so it is the "last good checkpoint" the error names."""
    import re

    rc, out = train(tmp_path, 20, 2, 2, extra=["--set", "lr=1e30", "--set", "warmup_steps=0", "--set", "grad_clip=0",
                                               "--set", "schedule=constant", "--set", "checkpoint_every=1",
                                               "--set", "checkpoint_async=true", "--set", "log_every=1"])
    assert rc != 0, out[-3000:]
    found = re.search(r"diverged at step (\d+).*Last good checkpoint: (\S+)", out)
    assert found, out[-3000:]
    step = int(found.group(1))
    assert step >= 2 and found.group(2).endswith(f"step_{step - 1:08d}"), found.group(0)
    assert (tmp_path / "checkpoints" / f"step_{step - 1:08d}" / "dcp" / "COMPLETE").is_file()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("env,sets,message", [
    ({}, ["ep_size=2"], "WORLD_SIZE is not set"),
    ({"WORLD_SIZE": "3", "RANK": "0"}, ["ep_size=2"], "must divide the world size 3"),
    ({"WORLD_SIZE": "3", "RANK": "0"}, ["ep_size=1"], "batch_size=16 must be divisible by the world size 3"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, ["micro_batch_size=16"], "micro_batch_size=16 must divide each rank's batch"),
    ({}, ["dp_replicate=2"], "dp_replicate=2 needs dp_replicate processes or a multiple"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, ["ep_size=2", "dp_replicate=4"],
     "dp_replicate=4 must divide world / ep_size = 4 / 2 = 2"),
    ({"WORLD_SIZE": "4", "RANK": "0"}, ["dp_replicate=2", "data_parallel=ddp"],
     "dp_replicate=2 (HSDP) needs data_parallel='fsdp', got data_parallel='ddp'"),
])
def test_bad_launch_exits_2_before_any_process_group(tmp_path, env, sets, message):
    cmd = [sys.executable, "-m", "softmoe", "train", "--workdir", str(tmp_path / "w"), "--set", "steps=2", *COMMON]
    for s in sets:
        cmd += ["--set", s]
    p = subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr + p.stdout


def test_experts_not_divisible_by_ep_size_exits_2(tmp_path):
    rc, out = train(tmp_path, 4, 2, 2, extra=["--set", "model.moe.num_experts=3"])
    assert rc != 0 and "ep_size=2 must divide num_experts=3" in out
    assert "exitcode  : 2" in out  # every rank: the CLI's bad-input status


def test_a_held_work_directory_stops_every_rank_at_once(tmp_path):
    # Rank 0 holds the work directory's lock for the whole run; when another run holds it, every
    # rank exits 2 at once (none waits for a collective that rank 0 never joins).
    from softmoe._lock import workdir_lock

    with workdir_lock(tmp_path):  # this test process plays the other run
        t0 = time.monotonic()
        rc, out = train(tmp_path, 4, 2, 2, timeout_s=60)
        elapsed = time.monotonic() - t0
    assert rc != 0 and "is in use by another run" in out and "held by another run" in out, out[-3000:]
    # Both ranks stopped on their own error (each printed it above); torchrun's summary lists the
    # first failure, with the CLI's bad-input status, and may stop the other rank before it exits.
    assert "exitcode  : 2" in out, out[-3000:]
    assert elapsed < 45  # far below the process-group timeout (300 s)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def _summary(workdir: Path) -> dict:
    return json.loads((workdir / "summary.json").read_text())


def test_peak_memory_per_rank_is_its_own_shard_and_no_rank_holds_a_whole_expert_tensor(tmp_path):
    # soft_moe_micro with 2048 experts per MoE layer: 134M of its 136M parameters are experts, so
    # parameters + gradients + Adam state are 2.2 GB in one process and 0.55 GB per rank at EP 4.
    # The peak is the process's resident-set high-water mark (CPU: torch keeps no allocator
    # statistics); the test compares growth during the run (peak - start), which leaves out the
    # interpreter and libraries. Measured on 2 loaded cores: 3009 MB in one process, 1095-1130 MB
    # per rank at 4 (0.37x; 190 MB of each rank's is the data and process groups of every rank).
    # eval_batch_size 32: evaluation activations (which per rank equal one process's at the same
    # rows) stay small beside the state. The 4-rank run goes through whole_tensor_guard.py, which
    # fails it if any op on any rank makes a tensor as large as one whole expert weight (E*D*H).
    sets = ["--set", "model.moe.num_experts=2048", "--set", "steps=3", "--set", "eval_batch_size=32",
            "--set", "checkpoint_every=1"]
    one = tmp_path / "one"
    ok(train(one, 3, extra=sets, timeout_s=300))
    four = tmp_path / "four"
    guard = Path(__file__).with_name("whole_tensor_guard.py")
    whole = 2048 * 64 * 256  # one expert weight of the model: E x D x H
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
            "--master-port", str(_port()), str(guard), str(whole), "train", "--workdir", str(four),
            "--set", "ep_size=4", *COMMON, *sets]
    p = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    for r in range(4):  # the guard ran on every rank and saw real work
        # searched, not matched at a line start: four processes share the pipe, and another
        # rank's output may land on the same line
        m = re.search(rf"guard rank {r}: (\d+) op outputs checked, largest (\d+) elements", out)
        assert m is not None, f"no guard line from rank {r}:\n{out[-4000:]}"
        checked, largest = int(m.group(1)), int(m.group(2))
        assert checked > 1000 and whole // 8 <= largest < whole, m.group(0)  # a local expert shard is E/4 x D x H
    s1, s4 = _summary(one), _summary(four)
    grow1 = s1["peak_memory_mb"] - s1["memory_start_mb"]
    grow4 = [p - s for p, s in zip(s4["peak_memory_mb_per_rank"], s4["memory_start_mb_per_rank"])]
    assert s1["memory_kind"] == s4["memory_kind"] == "process RSS"
    assert max(grow4) < 0.5 * grow1, (grow1, grow4)  # every rank well under half of one process
    assert grow4[0] <= 1.1 * max(grow4[1:]), grow4  # rank 0 holds no more than the others
