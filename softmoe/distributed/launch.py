"""Run one job of several local processes (tests, benchmarks) the way torchrun stops a job:
once a process fails, the others get `grace_s` seconds to fail on their own, then are killed."""
from __future__ import annotations

import subprocess
import time


def run_processes(commands: list[list[str]], envs: list[dict], timeout_s: float, grace_s: float = 30.0,
                  outputs: list | None = None) -> list[int]:
    """Start `commands[i]` with environment `envs[i]` (stdout and stderr to `outputs[i]`, a file
    object, if given); wait for all of them, at most `timeout_s` seconds in all; kill whatever is
    left. Returns the exit codes (negative: killed by that signal)."""
    if len(commands) != len(envs) or (outputs is not None and len(outputs) != len(commands)):
        raise ValueError(f"commands, envs (and outputs) must have one entry per process, got "
                         f"{len(commands)}, {len(envs)}, {None if outputs is None else len(outputs)}")
    procs = [subprocess.Popen(cmd, env=env, stdout=None if outputs is None else outputs[i],
                              stderr=None if outputs is None else subprocess.STDOUT)
             for i, (cmd, env) in enumerate(zip(commands, envs))]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace_s)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]
