"""(d) a short `softmoe train` run on the device, killed (SIGKILL) once its first checkpoint is
on disk, then resumed to the end: the resumed run must finish from that checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _command(workdir: Path, device: str, steps: int, every: int, resume: bool) -> list[str]:
    sets = {"device": device, "steps": steps, "checkpoint_every": every, "log_every": every, "plots": False,
            "tensorboard": False}
    cmd = [sys.executable, "-m", "softmoe", "train", "--config", "debug", "--workdir", str(workdir), "--no-progress"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return cmd + (["--resume"] if resume else [])


def kill_and_resume(workdir: Path, device: str, steps: int = 400, every: int = 20, timeout_s: float = 180) -> dict:
    """{"killed_after_s", "resumed_from", "steps", "test_accuracy", "ok"}: the first run is killed
    as soon as WORKDIR holds a complete checkpoint; the second resumes and finishes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[3]),
                                                                   os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    first = subprocess.Popen(_command(workdir, device, steps, every, False), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    from softmoe.train.checkpoint import latest_checkpoint

    try:
        while first.poll() is None and not (workdir.is_dir() and latest_checkpoint(workdir)):
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"no checkpoint after {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        if first.poll() is None:
            first.kill()
        _, err = first.communicate(timeout=60)
    killed = first.returncode != 0
    killed_after = time.perf_counter() - t0
    second = subprocess.run(_command(workdir, device, steps, every, True), env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    if second.returncode != 0:
        return {"ok": False, "error": (second.stderr or err)[-2000:], "killed": killed}
    summary = json.loads((workdir / "summary.json").read_text())
    return {"killed": killed, "killed_after_s": killed_after, "resumed_from": summary.get("resumed_from"),
            "steps": summary.get("steps"), "test_accuracy": summary.get("test_accuracy"),
            "ok": bool(killed and summary.get("resumed_from") and summary.get("steps") == steps)}
