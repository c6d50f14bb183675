"""Peak memory of a training run, per process (docs/distributed.md, "Memory per rank").

On CUDA: the caching allocator's peak of allocated tensor bytes on the run's device
(`torch.cuda.max_memory_allocated`, reset when the run starts). On the CPU, where torch keeps
no allocator statistics: the process's resident-set high-water mark (`ru_maxrss`), which also
counts the interpreter and its libraries, so the run's own growth is `peak_mb - start_mb`
(start: the resident set when the run began).
"""
from __future__ import annotations

import resource
import sys

import torch

_MB = 2 ** 20


def _rss_bytes() -> int:
    """The current resident set of this process (Linux: /proc/self/statm; elsewhere the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return _max_rss_bytes()


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


class PeakMemory:
    """`PeakMemory(device)` when a run starts; `read()` -> {"kind", "start_mb", "peak_mb"}."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = _rss_bytes()

    def read(self) -> dict:
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else _max_rss_bytes()
        return {"kind": "cuda allocated" if self.cuda else "process RSS", "start_mb": self.start / _MB,
                "peak_mb": peak / _MB}
