"""Timing: each implementation in worker processes of its own, all timed round-robin, one
round (a no-grad forward and a training step) at a time; medians over the rounds."""
from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from .impls import build, forward_no_grad, make_inputs, param_count, train_step
from .shape import Shape

# Above this many parameter bytes for all implementations together, one E is timed one
# implementation at a time instead of round-robin (E=512 is 2.4 GB of weights each).
ROUND_ROBIN_PARAM_BYTES = 3 << 30


def time_round(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """Seconds of one no-grad forward and of one training step. On CUDA: device time between
    CUDA events, after a synchronize (the host only queues the kernels)."""
    if x.device.type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda.synchronize(x.device)
        ev[0].record()
        forward_no_grad(model, x)
        ev[1].record()
        train_step(model, x, dy)
        ev[2].record()
        ev[2].synchronize()
        return ev[0].elapsed_time(ev[1]) / 1e3, ev[1].elapsed_time(ev[2]) / 1e3
    t0 = time.perf_counter()
    forward_no_grad(model, x)
    t1 = time.perf_counter()
    train_step(model, x, dy)
    return t1 - t0, time.perf_counter() - t1


class Worker:
    """One implementation in a Python process of its own, timed one round at a time on request.

    Why: in real use one implementation owns the process. Sharing one would let each
    implementation's allocations change the others' page faults (glibc's mmap threshold and
    heap are per process): in one process the ports ran up to 25% faster or slower depending
    on what ran before them. Caches are still shared, as they are with a model's other layers.

    Protocol (text lines): the worker prints "READY <params>" once built, then answers each
    "run" on its stdin with "TIME <forward s> <training step s>"; end of input ends it."""

    def __init__(self, name: str, s: Shape, threads: int, cwd: str | None = None) -> None:
        """`cwd`: the folder the worker starts in; a checkout of softmoe there is the one it
        imports (`python -c` puts the working folder first on sys.path), so that two
        versions can be timed side by side (benchmarks/ab_layer.py)."""
        spec = json.dumps({"impl": name, "shape": dataclasses.asdict(s), "threads": threads})
        code = "import sys; from softmoe.bench.layer.workers import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", code, spec], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=cwd)
        self.params = int(self._reply("READY")[0])

    def _reply(self, tag: str) -> list[str]:
        line = self.proc.stdout.readline()
        if not line.startswith(tag + " "):
            self.proc.kill()
            self.proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"benchmark worker for {self.name} failed (exit {self.proc.returncode}):\n"
                               f"{self._stderr.read()[-2000:]}")
        return line.split()[1:]

    def round(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        fwd, fb = self._reply("TIME")
        return float(fwd), float(fb)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._stderr.close()


def worker_main(argv: list[str]) -> int:
    """The `Worker` process: build, then one timed forward + training step per "run" line."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    s = Shape(**spec["shape"])
    model = build(spec["impl"], s)
    x, dy = make_inputs(s)
    print(f"READY {param_count(model)}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        fwd, fb = time_round(model, x, dy)
        print(f"TIME {fwd!r} {fb!r}", flush=True)
    return 0


def time_impls(names: list[str], s: Shape, repeats: int, warmup: int = 2, threads: int | None = None,
               same_process: bool = False, processes: int = 1) -> dict[str, dict]:
    """{name: {"fwd_s", "fwdbwd_s", "params"}}: medians over rounds timed round-robin, each
    implementation in worker processes of its own: `processes` of them one after another,
    `warmup` + `repeats` rounds each (so one process's allocator luck cannot decide the
    result). `same_process`: all implementations in this process, one pass."""
    threads = threads or torch.get_num_threads()
    bytes_each = 4 * 2 * s.experts * s.dim * s.hidden
    groups = [names] if bytes_each * len(names) <= ROUND_ROBIN_PARAM_BYTES else [[n] for n in names]
    times = {n: ([], []) for n in names}
    params = {}
    for group in groups:
        for _ in range(1 if same_process else processes):
            workers = {}
            try:
                if same_process:
                    x, dy = make_inputs(s)
                    models = {n: build(n, s) for n in group}
                    rounds = {n: functools.partial(time_round, m, x, dy) for n, m in models.items()}
                    params.update({n: param_count(m) for n, m in models.items()})
                else:
                    for n in group:
                        workers[n] = Worker(n, s, threads)
                    rounds = {n: w.round for n, w in workers.items()}
                    params.update({n: w.params for n, w in workers.items()})
                for r in range(warmup + repeats):
                    for n, step in rounds.items():
                        fwd, fb = step()
                        if r >= warmup:
                            times[n][0].append(fwd)
                            times[n][1].append(fb)
            finally:
                for w in workers.values():
                    w.close()
                rounds = models = None
    return {n: {"fwd_s": statistics.median(times[n][0]), "fwdbwd_s": statistics.median(times[n][1]),
                "params": params[n]} for n in names}
