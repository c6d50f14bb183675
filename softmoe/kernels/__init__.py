"""Compiled CPU kernels: batched matmuls for stacked experts with few rows per expert
(`bmm_nn`, `bmm_nt`, `bmm_tn`), and for few slots two passes of Soft MoE's routing backward
(`routing_dx_dw`, `combine_backward`).

Letters: E experts, M rows per expert, K the reduction, N output columns.

Each function computes what its docstring says with torch ops, except that on a CPU with
AVX-512, for float32 tensors in the shapes where it is faster (few rows per expert, weights
too large for cache: `use_kernel`; few slots: `use_routing_kernel`), it calls `smallm.cpp`
or `routing.cpp` instead. Those files are compiled together on
first use with the system's C++ compiler (`$CXX`, else g++, else c++) into
`$SOFTMOE_KERNEL_DIR` (default `~/.cache/softmoe/kernels`; a private temporary folder if that
is not writable), once per source, compiler and torch version, and loaded with ctypes. So
installing needs no build step, and the build (no torch headers) is short. Without
a compiler or AVX-512 everything runs on torch ops (`status()` says why).

On or off: `with use_kernels(False): ...` for a block (this thread / context only,
nestable); `set_enabled(flag)` for the process; the default comes from the environment
(`SOFTMOE_KERNELS=0` turns them off).

Why: the expert MLP's six batched matmuls are most of a Soft MoE layer's training step, and
with few rows per expert these kernels run them faster than MKL's batched GEMM on AVX-512
CPUs; with few slots the routing backward is bound by passes over (B, N, D) tensors, which
`routing_dx_dw` makes one (measured figures: docs/benchmarks.md, `softmoe bench layer`).

Results agree with torch's to float32 rounding (a different summation order), not bitwise.
Never used while tracing or compiling (`torch.compile` sees the torch ops), for tensor
subclasses, or on other devices.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .._io import atomic_write, user_cache_dir

__all__ = ["bmm_nn", "bmm_nt", "bmm_tn", "routing_dx_dw", "combine_backward", "use_kernel", "use_routing_kernel",
           "use_kernels", "status", "set_enabled"]

log = logging.getLogger(__name__)

# Where the kernels win, measured as whole SoftMoE training steps, kernels on against off (a
# matmul timed alone in a loop keeps its weights in cache, which a training step does not;
# figures in docs/benchmarks.md):
# - up to 64 rows per expert: beyond, MKL's packing pays off (the input-gradient kernel stops
#   at 64);
# - at least 8 MiB of weights (E*D*H*4 bytes): below, the step is about as fast either way.
MAX_ROWS = 64
MIN_WEIGHT_BYTES = 8 << 20
# `routing_dx_dw` and `combine_backward`: at most 8 slots (their sums over tokens stay in
# registers; measured at B=32, N=196, D=384 in a loop, inputs in cache: 0.77x and 0.86x
# torch's time at S=8, 1.4x and 1.16x at S=16, routing_dx_dw 1.8x at S=128).
MAX_ROUTING_SLOTS = 8

_SOURCES = (Path(__file__).with_name("smallm.cpp"), Path(__file__).with_name("routing.cpp"))
_FLAGS = ["-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-fPIC", "-shared"]
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # not subclasses such as DTensor or FakeTensor
_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "why": "not loaded yet", "failed": False, "enabled": None}
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar("softmoe_kernels", default=None)


@contextlib.contextmanager
def use_kernels(enabled: bool):
    """Turn the compiled kernels on (where `use_kernel` allows) or off inside the block, for
    this thread (context) only; nestable; the previous setting comes back on exit."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    token = _override.set(enabled)
    try:
        yield
    finally:
        _override.reset(token)


def set_enabled(enabled: bool) -> None:
    """Turn the compiled kernels on (where `use_kernel` allows) or off for this process."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {enabled!r}")
    _state["enabled"] = enabled


def _enabled() -> bool:
    override = _override.get()
    if override is not None:
        return override
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("SOFTMOE_KERNELS", "1") != "0"
    return _state["enabled"]


def status() -> str:
    """One line: whether the compiled kernels are in use, and if not, why."""
    if not _enabled():
        return "off (SOFTMOE_KERNELS=0, set_enabled(False) or use_kernels(False))"
    lib = _library()
    return f"on ({_state['path']})" if lib is not None else f"unavailable: {_state['why']}"


def use_kernel(rows: int, large_numel: int, out: torch.Tensor | None, out_shape: tuple,
               *inputs: torch.Tensor | None) -> bool:
    """Whether a `bmm_*` call runs its compiled kernel: `rows` per expert (M), `large_numel` the
    size of the per-expert operand that streams from memory (the weights, or for `bmm_tn` the
    weight-gradient output), all tensors plain contiguous float32 CPU tensors outside autograd."""
    if (
        not _enabled()
        or not 1 <= rows <= MAX_ROWS
        or large_numel * 4 < MIN_WEIGHT_BYTES
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or (out is not None and tuple(out.shape) != tuple(out_shape))  # torch.bmm resizes such an `out`
    ):
        return False
    return _plain_float32(*inputs, out) and _library() is not None


def _plain_float32(*tensors: torch.Tensor | None) -> bool:
    """Every tensor given (None skipped) is a plain contiguous float32 CPU tensor outside autograd."""
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.device.type != "cpu" or t.dtype != torch.float32:
            return False
        if not t.is_contiguous() or (t.requires_grad and torch.is_grad_enabled()):
            return False  # a ctypes call records no autograd graph
    return True


def bmm_nn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """a (E, M, K) @ b (E, K, N) [+ bias (E, N)] -> (E, M, N)."""
    E, M, K = a.shape
    N = b.shape[2]
    if not use_kernel(M, b.numel(), out, (E, M, N), a, b, bias):
        if bias is None:
            return torch.bmm(a, b, out=out)
        return torch.baddbmm(bias.unsqueeze(1), a, b, out=out)
    out = a.new_empty(E, M, N) if out is None else out
    _library().smallm_nn(E, M, K, N, a.data_ptr(), b.data_ptr(), None if bias is None else bias.data_ptr(),
                         out.data_ptr(), torch.get_num_threads())
    return out


def bmm_nt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (E, M, K) @ b (E, N, K)^T -> (E, M, N)."""
    E, M, K = a.shape
    N = b.shape[1]
    if not use_kernel(M, b.numel(), out, (E, M, N), a, b):
        return torch.bmm(a, b.transpose(1, 2), out=out)
    out = a.new_empty(E, M, N) if out is None else out
    threads = torch.get_num_threads()
    if _library().smallm_nt(E, M, K, N, a.data_ptr(), b.data_ptr(), out.data_ptr(), threads):
        raise MemoryError(f"bmm_nt: cannot allocate its packing buffers ({threads} threads, K={K})")
    return out


def bmm_tn(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (E, M, K)^T @ b (E, M, N) -> (E, K, N)."""
    E, M, K = a.shape
    N = b.shape[2]
    if not use_kernel(M, E * K * N, out, (E, K, N), a, b):
        return torch.bmm(a.transpose(1, 2), b, out=out)
    out = a.new_empty(E, K, N) if out is None else out
    _library().smallm_tn(E, M, K, N, a.data_ptr(), b.data_ptr(), out.data_ptr(), torch.get_num_threads())
    return out


def use_routing_kernel(slots: int, *tensors: torch.Tensor | None) -> bool:
    """Whether `routing_dx_dw` or `combine_backward` runs its compiled kernel: at most
    `MAX_ROUTING_SLOTS` slots, `tensors` (None skipped) plain float32 CPU tensors outside
    autograd, the first one (B, N, D) and not empty, every one contiguous in its last
    dimension and, when 3-D, in its rows too unless it is a per-sequence slot view (any
    strides for its first two dimensions: `slot_view`)."""
    if not (_enabled() and 1 <= slots <= MAX_ROUTING_SLOTS and tensors[0].dim() == 3 and tensors[0].numel() > 0
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()):
        return False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN or t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1:
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return _library() is not None


def routing_dx_dw(x: torch.Tensor, dispatch: torch.Tensor, g: torch.Tensor, g_xs: torch.Tensor,
                  w: torch.Tensor, c: torch.Tensor | None, out: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The last pass of Soft MoE's routing backward, (dx (B, N, D), dw (D, S)):
        dx = dispatch g_xs + g w^T - c x      (per sequence; the c term only when c is given)
        dw = sum over sequences of x^T g
    for x (B, N, D), dispatch and g (B, N, S), g_xs (B, S, D) (any strides with the last one
    1: the slot-major view), w (D, S), c (B, N) or None; `out` the buffer for dx (None: new).
    The kernel (`use_routing_kernel`) reads x once and writes dx once; torch ops otherwise."""
    B, N, D = x.shape
    S = w.shape[1]
    if c is not None and c.dim() == 3:
        c = c.reshape(B, N)
    if not (use_routing_kernel(S, x, g_xs, w) and _plain_float32(x, dispatch, g, c, out)):
        dx = torch.bmm(dispatch, g_xs, out=out)  # (B, N, D)
        dx.view(B * N, D).addmm_(g.reshape(B * N, S), w.t())
        if c is not None:
            dx.addcmul_(x, c.unsqueeze(-1), value=-1.0)
        dw = torch.mm(g.reshape(B * N, S).t(), x.reshape(B * N, D)).t()  # MKL is faster in this orientation
        return dx, dw
    dx = x.new_empty(B, N, D) if out is None else out
    w_t = w.t().contiguous()  # (S, D)
    dw_t = x.new_empty(S, D)
    threads = torch.get_num_threads()
    if _library().routing_dx_dw(B, N, D, S, x.data_ptr(), dispatch.data_ptr(), g.data_ptr(), g_xs.data_ptr(),
                                g_xs.stride(0), g_xs.stride(1), w_t.data_ptr(),
                                None if c is None else c.data_ptr(), dx.data_ptr(), dw_t.data_ptr(), threads):
        raise MemoryError(f"routing_dx_dw: cannot allocate its per-thread buffers ({threads} threads, S={S}, D={D})")
    return dx, dw_t.t()


def combine_backward(gy: torch.Tensor, combine: torch.Tensor, ys: torch.Tensor, g_ys: torch.Tensor | None,
                     want_combine: bool) -> torch.Tensor | None:
    """The combine's backward (y = combine ys per sequence): writes dL/dys = combine^T gy into
    `g_ys` (B, S, D) (any strides with the last one 1, e.g. the slot-major view; None: not
    needed) and returns dL/dcombine = gy ys^T (B, N, S) if `want_combine` (else None), for gy
    (B, N, D), combine (B, N, S), ys (B, S, D) (strided like g_ys). The kernel reads gy from
    memory once (`use_routing_kernel`); torch's two bmm's otherwise."""
    B, N, D = gy.shape
    S = combine.shape[2]
    if not (use_routing_kernel(S, gy, ys, g_ys) and _plain_float32(gy, combine)):
        if g_ys is not None:
            torch.bmm(combine.transpose(1, 2), gy, out=g_ys)
        return torch.bmm(gy, ys.transpose(1, 2)) if want_combine else None
    g_combine = gy.new_empty(B, N, S) if want_combine else None
    _library().combine_backward(B, N, D, S, gy.data_ptr(), combine.data_ptr(), ys.data_ptr(), ys.stride(0),
                                ys.stride(1), None if g_ys is None else g_ys.data_ptr(),
                                0 if g_ys is None else g_ys.stride(0), 0 if g_ys is None else g_ys.stride(1),
                                None if g_combine is None else g_combine.data_ptr(), torch.get_num_threads())
    return g_combine


def _library():
    """The loaded kernels (ctypes.CDLL), building them on first call; None where unavailable."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["lib"] = _load()
                _state["why"] = ""
            except _Unavailable as e:
                _state["why"] = str(e)
                log.info("softmoe.kernels: compiled kernels unavailable (%s); using torch ops", e)
            except Exception as e:  # a failed build or self-test: say so once, then use torch ops
                _state["why"] = f"{type(e).__name__}: {e}"
                _state["failed"] = True
                log.warning("softmoe.kernels: compiled kernels failed (%s); using torch ops", _state["why"])
            _state["tried"] = True
    return _state["lib"]


class _Unavailable(RuntimeError):
    """An expected reason not to use the kernels (no AVX-512, no compiler): logged at info."""


def _load():
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise _Unavailable(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, kernels need AVX512")
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise _Unavailable("no C++ compiler ($CXX, g++ or c++)")
    sources = [src.read_bytes() for src in _SOURCES]
    key = hashlib.sha256(b"\0".join([*sources, " ".join(_FLAGS).encode(), compiler.encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    def build(tmp: str) -> None:
        cmd = [*shlex.split(compiler), *_FLAGS, *map(str, _SOURCES), "-o", tmp]  # $CXX may be "ccache g++"
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")

    path, private = user_cache_dir("kernels", "SOFTMOE_KERNEL_DIR") / f"smallm-{key}.so", False
    if not path.exists():
        try:
            atomic_write(path, build)  # concurrent builders each rename a whole file into place
        except OSError as e:  # an unwritable cache: build in a private folder, for this process only
            log.info("softmoe.kernels: cannot write %s (%s); building in a temporary folder", path.parent, e)
            path, private = Path(tempfile.mkdtemp(prefix="softmoe-kernels-")) / path.name, True
            atomic_write(path, build)
    lib = ctypes.CDLL(str(path))
    if private:  # a loaded library stays mapped: its file is not needed any more
        shutil.rmtree(path.parent, ignore_errors=True)
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.smallm_nn.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, cint]
    lib.smallm_nt.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, cint]
    lib.smallm_tn.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, cint]
    lib.routing_dx_dw.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, cint]
    lib.combine_backward.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, i64, i64, ptr, cint]
    lib.smallm_nn.restype = lib.smallm_tn.restype = lib.combine_backward.restype = None
    lib.smallm_nt.restype = lib.routing_dx_dw.restype = ctypes.c_int
    _state["path"] = str(path)
    _self_test(lib)
    return lib


def _self_test(lib) -> None:
    """Odd shapes (every tail path) against float64 torch; raises if any is off."""
    g = torch.Generator().manual_seed(0)
    E, M, K, N = 3, 13, 70, 53
    a, b = torch.randn(E, M, K, generator=g), torch.randn(E, K, N, generator=g)
    bias, bt, c = torch.randn(E, N, generator=g), torch.randn(E, N, K, generator=g), torch.randn(E, M, N, generator=g)
    got = [torch.empty(E, M, N), torch.empty(E, M, N), torch.empty(E, K, N)]
    # 2 threads with E=3: also the path that splits an expert's output between threads
    lib.smallm_nn(E, M, K, N, a.data_ptr(), b.data_ptr(), bias.data_ptr(), got[0].data_ptr(), 2)
    if lib.smallm_nt(E, M, K, N, a.data_ptr(), bt.data_ptr(), got[1].data_ptr(), 2):
        raise MemoryError("self-test of smallm_nt: allocation failed")
    lib.smallm_tn(E, M, K, N, a.data_ptr(), c.data_ptr(), got[2].data_ptr(), 2)
    a64 = a.double()
    want = [torch.baddbmm(bias.double().unsqueeze(1), a64, b.double()),
            torch.bmm(a64, bt.double().transpose(1, 2)), torch.bmm(a64.transpose(1, 2), c.double())]
    # routing: S=7 slots (a partial slot chunk), D=70 (a partial column block and a tail
    # vector), strided g_xs as the slot-major view makes it
    B, N, D, S = 3, 5, 70, 7
    x, dw, gr = torch.randn(B, N, D, generator=g), torch.rand(B, N, S, generator=g), torch.randn(B, N, S, generator=g)
    g_xs, w = torch.randn(S, B, D, generator=g).transpose(0, 1), torch.randn(D, S, generator=g)
    cr, dx, dw_t, w_t = torch.randn(B, N, generator=g), torch.empty(B, N, D), torch.empty(S, D), w.t().contiguous()
    if lib.routing_dx_dw(B, N, D, S, x.data_ptr(), dw.data_ptr(), gr.data_ptr(), g_xs.data_ptr(), g_xs.stride(0),
                         g_xs.stride(1), w_t.data_ptr(), cr.data_ptr(), dx.data_ptr(), dw_t.data_ptr(), 2):
        raise MemoryError("self-test of routing_dx_dw: allocation failed")
    x64, g64 = x.double(), gr.double()
    got += [dx, dw_t.t()]
    want += [torch.bmm(dw.double(), g_xs.double()) + g64 @ w.double().t() - cr.double().unsqueeze(-1) * x64,
             x64.reshape(-1, D).t() @ g64.reshape(-1, S)]
    # combine backward on the same operands: x as dL/dy, dw as the combine weights, g_xs as ys
    g_ys, g_c = torch.empty(S, B, D).transpose(0, 1), torch.empty(B, N, S)
    lib.combine_backward(B, N, D, S, x.data_ptr(), dw.data_ptr(), g_xs.data_ptr(), g_xs.stride(0), g_xs.stride(1),
                         g_ys.data_ptr(), g_ys.stride(0), g_ys.stride(1), g_c.data_ptr(), 2)
    got += [g_ys, g_c]
    want += [dw.double().transpose(1, 2) @ x64, x64 @ g_xs.double().transpose(1, 2)]
    for name, x, y in zip(("smallm_nn", "smallm_nt", "smallm_tn", "routing_dx_dw (dx)", "routing_dx_dw (dw)",
                           "combine_backward (dL/dys)", "combine_backward (dL/dcombine)"), got, want):
        err = ((x.double() - y).abs().max() / y.abs().max()).item()
        if not err < 1e-5:
            raise RuntimeError(f"self-test of {name} failed: relative error {err:.2e}")
