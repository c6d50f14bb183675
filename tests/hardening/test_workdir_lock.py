"""One run per work directory (softmoe/_lock.py): held for the run, released on exit and on
errors, stale locks of dead processes taken over, a second run refused with exit 2."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softmoe._lock import LOCK_NAME, WorkdirLocked, workdir_lock
from softmoe.cli import main

REPO = Path(__file__).resolve().parents[2]
LINUX_PROC = Path("/proc/self/stat").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(workdir: Path, **info) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "started": time.time(), "command": "x", **info}))
    return lock


def test_held_for_the_block_and_released_also_on_errors(tmp_path):
    wd = tmp_path / "new" / "wd"  # created
    with workdir_lock(wd) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert not lock.exists() and wd.is_dir()
    with pytest.raises(KeyError):
        with workdir_lock(wd):
            raise KeyError("boom")
    assert not lock.exists()


def test_a_second_holder_is_refused_naming_the_directory_and_pid(tmp_path):
    with workdir_lock(tmp_path) as lock:
        with pytest.raises(WorkdirLocked) as info:
            with workdir_lock(tmp_path):
                pass
        assert lock.exists()  # the refused attempt left the holder's lock alone
    assert isinstance(info.value, ValueError)  # the CLI's user errors: exit 2
    assert str(tmp_path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)


def test_the_lock_of_a_dead_process_is_stale(tmp_path):
    lock = _write_lock(tmp_path, pid=_dead_pid())
    with workdir_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


@pytest.mark.skipif(not LINUX_PROC, reason="process start times come from /proc")
def test_a_reused_pid_is_stale(tmp_path):
    from softmoe._lock import _start_ticks

    _write_lock(tmp_path, pid=os.getpid(), start_ticks=_start_ticks(os.getpid()) - 1)  # an earlier process
    with workdir_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["start_ticks"] == _start_ticks(os.getpid())


def test_a_lock_from_another_host_is_never_broken(tmp_path):
    lock = _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere")
    before = lock.read_text()
    with pytest.raises(WorkdirLocked, match="on host 'elsewhere'") as info:
        with workdir_lock(tmp_path):
            pass
    assert str(lock) in str(info.value) and lock.read_text() == before


def test_an_unreadable_lock_is_stale_only_once_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")  # a writer between create and write, or one that crashed there
    with pytest.raises(WorkdirLocked, match="not readable"):
        with workdir_lock(tmp_path):
            pass
    old = time.time() - 120
    os.utime(lock, (old, old))
    with workdir_lock(tmp_path):
        pass
    assert not lock.exists()


def test_an_unwritable_place_is_a_permission_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PermissionError, match="work directory .* is not writable"):
        with workdir_lock(tmp_path / "file" / "wd"):
            pass


def _train_argv(workdir: Path, steps: int) -> list[str]:
    return ["train", "--config", "debug", "--set", f"steps={steps}", "--set", "warmup_steps=0", "--set",
            "batch_size=16", "--set", "log_every=1", "--set", "checkpoint_every=0", "--set", "plots=false",
            "--set", "tensorboard=false", "--set", "num_threads=1", "--set", "eval_batch_size=512",
            "--no-progress", "--workdir", str(workdir)]


def _train_steps(workdir: Path) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_the_same_training_started_twice(tmp_path):
    """While run A trains, the same command (`python -m softmoe`, a fresh process as a user
    starts it) in the same directory exits 2 at once, one line naming A's pid, writing
    nothing; after A is SIGKILLed its lock is stale and a new run starts over with a clean,
    monotonic metrics log."""
    wd = tmp_path / "wd"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    a = subprocess.Popen([sys.executable, "-m", "softmoe", *_train_argv(wd, 100_000)], env=env, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((wd / "metrics.jsonl").is_file() and len(_train_steps(wd)) >= 2):
            assert a.poll() is None, a.stderr.read()
            assert time.time() < deadline, "run A did not start logging"
            time.sleep(0.2)
        b = subprocess.run([sys.executable, "-m", "softmoe", *_train_argv(wd, 100_000)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert b.returncode == 2 and "Traceback" not in b.stderr
        assert b.stderr.startswith("softmoe train: error: ") and b.stderr.count("\n") == 1
        assert f"work directory {str(wd)!r} is in use" in b.stderr and f"pid {a.pid}" in b.stderr
        os.kill(a.pid, signal.SIGKILL)
        a.wait(timeout=60)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
        a.stderr.close()
    steps = _train_steps(wd)
    assert steps == list(range(1, len(steps) + 1))  # only A wrote, in order
    assert (wd / LOCK_NAME).is_file()  # SIGKILL: no chance to remove it
    assert main(_train_argv(wd, 2)) == 0  # the dead run's lock is stale: taken over
    assert _train_steps(wd) == [1, 2]  # A's log (it never checkpointed) was dropped, not appended to
    assert not (wd / LOCK_NAME).exists()
