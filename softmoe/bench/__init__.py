"""Benchmarks, run as `softmoe bench <name>`.

Every module of this package that defines `add_arguments(parser)` and `run(args) -> int`
becomes the sub-command `softmoe bench <module name>` (its help is the first line of the
module docstring). This file holds the measuring helpers they share: median wall-clock
timing, the machine's large-matmul GFLOP/s and memory bandwidth, peak resident memory (tables: softmoe._tables).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls after `warmup` calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=None, device=None) -> float:
    """GFLOP/s of one (n, n) x (n, n) matmul (2 n^3 FLOPs, median of `repeats`): the
    machine's attainable dense-matmul rate at the current `torch.get_num_threads()` (on a
    CUDA `device`: that GPU's, each call synchronized)."""
    import torch

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype or torch.float32).to(device or "cpu")
    b = torch.randn(n, n, generator=g, dtype=dtype or torch.float32).to(device or "cpu")
    out = torch.empty_like(a)
    # out= keeps page faults of a fresh 16 MB result out of the number: this is the
    # arithmetic rate the layers are compared against.
    if a.device.type == "cuda":
        def step():
            torch.mm(a, b, out=out)
            torch.cuda.synchronize(a.device)
    else:
        def step():
            torch.mm(a, b, out=out)
    seconds = median_time(step, repeats=repeats, warmup=2)
    return 2.0 * n ** 3 / seconds / 1e9


def triad_gbs(mib: int = 256, repeats: int = 5) -> float:
    """GB/s of the STREAM triad `a = b + 3 c` over three float32 CPU arrays of `mib` MiB each
    (median of `repeats`, at the current `torch.get_num_threads()`), counting 3 x `mib` MiB per
    pass (two reads, one write), as STREAM does: the machine's attainable memory bandwidth, the
    other axis of a CPU roofline beside `matmul_gflops`. The arrays are written once before timing
    so that no page fault is counted."""
    import torch

    if mib < 1:
        raise ValueError(f"mib must be >= 1, got {mib}")
    n = mib * 2**20 // 4
    a, b, c = torch.zeros(n), torch.ones(n), torch.full((n,), 2.0)
    seconds = median_time(lambda: torch.add(b, c, alpha=3.0, out=a), repeats=repeats, warmup=2)
    return 3 * n * 4 / seconds / 1e9


# -- peak resident memory (Linux /proc) ------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def peak_rss_supported() -> bool:
    """True where the kernel lets a process reset its RSS high-water mark (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except (OSError, RuntimeError):
        return False


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`), so that the next baseline
    RSS counts live memory only. A no-op where glibc is not the allocator."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set size peaks above its level just before `fn()`.

    Resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), runs `fn`, reads
    VmHWM. Exact at page granularity for memory that is touched; run it in a fresh process
    with a fixed small mmap threshold (`MALLOC_MMAP_THRESHOLD_`) so that memory freed before
    the baseline is not silently reused by `fn`."""
    release_free_memory()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024
