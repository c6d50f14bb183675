"""Peak memory: one fresh subprocess per (implementation, shape) measures the peak RSS of a
no-grad forward and of a training step (softmoe.bench.peak_rss_bytes)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch

from softmoe.bench import peak_rss_bytes

from .impls import build, forward_no_grad, make_inputs, train_step
from .shape import Shape


def probe(name: str, s: Shape, threads: int) -> dict:
    """Runs inside the subprocess: peak RSS above the baseline after model creation and one
    warm-up pass of the same kind (so one-time allocations such as thread pools are not
    counted). The forward is measured before any training step (inference use). Buffers
    that softmoe's `BufferPool`s keep from the warm-up are resident before the measured pass,
    so they are added back: the figure is what the pass needs on top of the model and its
    inputs, retained buffers included."""
    from softmoe.layers import pooled_bytes

    torch.set_num_threads(threads)
    model = build(name, s)
    x, dy = make_inputs(s)
    forward_no_grad(model, x)
    fwd = pooled_bytes(model) + peak_rss_bytes(lambda: forward_no_grad(model, x))
    train_step(model, x, dy)
    for p in model.parameters():
        p.grad = None
    fb = pooled_bytes(model) + peak_rss_bytes(lambda: train_step(model, x, dy))
    return {"fwd_peak_bytes": fwd, "fwdbwd_peak_bytes": fb}


def probe_main(argv: list[str]) -> int:
    """The probe process: prints "PROBE <json of probe()>"."""
    spec = json.loads(argv[0])
    result = probe(spec["impl"], Shape(**spec["shape"]), spec["threads"])
    print("PROBE " + json.dumps(result))
    return 0


def measure_memory(name: str, s: Shape, threads: int, timeout: float = 600) -> dict:
    """Peak-RSS probe of one (implementation, shape) in a fresh Python process. glibc's mmap
    threshold is pinned at 64 KiB there, so freed blocks go back to the OS at once and RSS
    follows live memory."""
    spec = json.dumps({"impl": name, "shape": dataclasses.asdict(s), "threads": threads})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import sys; from softmoe.bench.layer.memory import probe_main; sys.exit(probe_main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise RuntimeError(f"memory probe for {name} {s.label()} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
