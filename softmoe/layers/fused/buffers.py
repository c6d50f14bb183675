"""Large CPU buffers for the fused backward passes: reused from step to step (`BufferPool`),
optionally backed by transparent huge pages (`fresh_buffer`).

Why: every training step allocates new (E, D, H) weight gradients (`optimizer.zero_grad()`
sets them to None) and new activation-sized temporaries. glibc serves blocks at or above its
mmap threshold (which grows with the largest block freed, up to 32 MiB) with a fresh mmap,
so every step the kernel faults them in and zeroes them 4 KiB at a time. At E=128, D=384,
H=1536 that is 147k page faults per step, 576 MiB zeroed, which can cost more than the
matmuls that fill those buffers (docs/benchmarks.md). (PyTorch caches GPU memory itself; on CPU it leaves this to libc.)

Ownership: each layer that runs a fused path has its own pool (`pool_of(module)`), and each
role below is written by one Function of this package. A Soft MoE layer runs its experts
with its own pool, so that its routing backward may borrow the experts' dead hidden buffer;
a standalone `Experts` (or the experts of Tokens/Experts Choice) uses its own.

    role      shape       written by (file)                     borrowed as scratch by
    slots     (E, P*B, D) _FusedSoftRouting.forward (routing)   its backward: dL/dlogits
    y         (B, N, D)   _FusedCombine.forward (routing)       -
    g_ys      (E, P*B, D) _FusedCombine.backward (routing)      routing backward: a temporary
    h         (E, M, H)   _ExpertsMLP.forward (experts);        routing backward: dL/dx
                          its backward writes dL/dh over h
    a         (E, M, H)   _ExpertsMLP.forward: gelu(h)          -
    w2_grad   (E, H, D)   _ExpertsMLP.backward                  -
    w1_grad   (E, D, H)   _ExpertsMLP.backward                  its backward: dL/da (dead
                                                                before dL/dw1 is written)
    dx        (B, N, D)   routing backward, when "h" is too small to hold dL/dx
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading

import torch

# Private but long-standing (torch >= 2.0): the reference count of a StorageImpl. Without it
# the pool never reuses anything (every request is a fresh buffer).
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class BufferPool:
    """One reusable CPU buffer per role (e.g. "w1_grad") for one module.

    `empty(role, shape, like)` is `torch.empty(shape)` with `like`'s dtype and device, except
    that on CPU it hands out the storage it gave for that role last time, when that storage is
    otherwise unreferenced: no tensor, view, `.grad` or saved tensor anywhere still points to
    it. That is checked exactly (the storage's reference count is 1: the pool's own handle),
    so nothing anyone can still read is ever overwritten; when the old buffer is still in use
    (for example `.grad` kept for gradient accumulation, or a second forward before the first
    backward) a new one is allocated and becomes the role's buffer.

    Cost: between steps the pool keeps each role's last buffer alive. For weight gradients
    that is the memory `zero_grad(set_to_none=False)` would keep; roles are chosen so that the
    peak of a training step does not grow (see the layers' docstrings). `clear()` drops them;
    `enabled = False` turns reuse off.

    Returned tensors are ordinary tensors; autograd adopts a returned gradient as `.grad`
    without a copy, exactly as it would a fresh one. Thread-safe. Not used for non-CPU
    devices, whose caching allocators already reuse memory.
    """

    def __init__(self) -> None:
        self.enabled = _storage_use_count is not None
        self._storages: dict[str, torch.UntypedStorage] = {}
        self._lock = threading.Lock()

    def empty(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        if not self.enabled or like.device.type != "cpu":
            return fresh_buffer(shape, like)
        with self._lock:  # the count check and the take must not interleave with another thread's
            out = self._take(role, shape, like, exact=True)
            if out is None:
                out = fresh_buffer(shape, like)
                self._storages[role] = out.untyped_storage()
            return out

    def scratch(self, role: str, shape, like: torch.Tensor) -> torch.Tensor | None:
        """A view of the start of `role`'s buffer when that is free and large enough, else None
        (the caller allocates). While the view lives the buffer counts as in use: meant for
        data that is dead before `role` is next asked for (if it is not, that request gets
        a new buffer)."""
        if not self.enabled or like.device.type != "cpu":
            return None
        with self._lock:
            return self._take(role, shape, like, exact=False)

    def _take(self, role: str, shape, like: torch.Tensor, exact: bool) -> torch.Tensor | None:
        """`role`'s buffer viewed as `shape`, if nothing else references it and its size fits
        (equal when `exact`, else at least). Call with the lock held."""
        st = self._storages.get(role)
        if st is None or _storage_use_count(st._cdata) != 1:
            return None
        nbytes = math.prod(shape) * like.element_size()
        if st.nbytes() != nbytes if exact else st.nbytes() < nbytes:
            return None
        return torch.empty(0, dtype=like.dtype, device=like.device).set_(st, 0, shape)

    # A copied or pickled module gets an empty pool of its own (a lock cannot be copied, and
    # buffers must never be shared between modules).
    def __getstate__(self) -> dict:
        return {"enabled": self.enabled}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.enabled = state["enabled"] and self.enabled

    def clear(self) -> None:
        """Forget every buffer (memory still referenced elsewhere stays with its owners)."""
        with self._lock:
            self._storages.clear()

    def nbytes(self) -> int:
        """Bytes held by the pool alone (buffers nothing else references)."""
        with self._lock:
            return sum(st.nbytes() for st in self._storages.values()
                       if _storage_use_count is not None and _storage_use_count(st._cdata) == 1)


def pool_of(module: torch.nn.Module) -> BufferPool:
    """`module`'s own pool, created on first use: the fused path keeps its buffers on the
    module it runs for (attribute `buffer_pool`), and no module uses another's."""
    pool = module.__dict__.get("buffer_pool")
    if pool is None:
        pool = module.__dict__.setdefault("buffer_pool", BufferPool())  # setdefault: one winner
    return pool


def buffer_pools(model: torch.nn.Module):
    """The pool of every module of `model` that has an `impl` (the layers with a fused path),
    created where missing so that a switch made before the first step holds."""
    for module in model.modules():
        if hasattr(module, "impl"):
            yield pool_of(module)


def pooled_bytes(model: torch.nn.Module) -> int:
    """Bytes `model`'s pools hold that nothing else references (what `release_buffers` frees)."""
    return sum(pool.nbytes() for pool in buffer_pools(model))


def set_buffer_reuse(model: torch.nn.Module, enabled: bool) -> None:
    """Turn buffer reuse on or off in every pool of `model` (off also releases the buffers)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    for pool in buffer_pools(model):
        pool.enabled = enabled and _storage_use_count is not None
        if not enabled:
            pool.clear()


def release_buffers(model: torch.nn.Module) -> int:
    """Drop every buffer `model`'s pools keep between steps (e.g. after training, before
    inference at another shape). Returns the bytes freed. Reuse starts again at the next step."""
    freed = pooled_bytes(model)
    for pool in buffer_pools(model):
        pool.clear()
    return freed


def pooled_empty(pool: BufferPool | None, role: str, shape, like: torch.Tensor) -> torch.Tensor:
    """`pool.empty(role, shape, like)`, or a fresh buffer without a pool."""
    return fresh_buffer(shape, like) if pool is None else pool.empty(role, shape, like)


def pooled_scratch(pool: BufferPool | None, role: str, shape, like: torch.Tensor) -> torch.Tensor | None:
    """`pool.scratch(role, shape, like)`, or None without a pool (ops given `out=None` allocate)."""
    return None if pool is None else pool.scratch(role, shape, like)


# -- huge pages (opt-in) ---------------------------------------------------------------------
# Asking for transparent huge pages cuts the fault count of a fresh buffer 512x, but with the
# common THP setting defrag=madvise a fault may then compact memory synchronously, which can
# make a step slower instead of faster. So the advice is opt-in:
# SOFTMOE_HUGEPAGES=1. With `BufferPool` reuse it only matters for the first step.
_HUGE_PAGE = 2 << 20
_MADVISE_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise where transparent huge pages can be requested, else None.
    Off unless `SOFTMOE_HUGEPAGES=1` is in the environment (see above)."""
    if not sys.platform.startswith("linux") or os.environ.get("SOFTMOE_HUGEPAGES", "0") != "1":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        if "[never]" in mode:
            return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def fresh_buffer(shape, like: torch.Tensor) -> torch.Tensor:
    """`torch.empty(shape)` with `like`'s dtype/device, its pages not yet touched; with
    SOFTMOE_HUGEPAGES=1, CPU buffers of 32 MiB and more are, on Linux, advised to be backed by
    transparent huge pages."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device)
    if out.device.type != "cpu" or out.nbytes < _MADVISE_MIN_BYTES or torch.compiler.is_compiling():
        return out
    madvise = _madvise()
    if madvise is not None:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the 2 MiB-aligned interior
        end = (out.data_ptr() + out.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a failure changes nothing
    return out
