"""E expert MLPs as one stacked weight set, applied with two batched matmuls.

Einsum letters: E experts, M items per expert (slots or capacity buffer), D model width,
H expert hidden width.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .common import check_choice, check_positive_int

EXPERT_INITS = ("identical", "distinct")

# -- fresh large buffers, optionally backed by transparent huge pages (Linux, CPU) -------------
# Every training step allocates new (E, D, H) weight gradients (optimizer.zero_grad() sets
# them to None). glibc serves blocks of 32 MiB and more (its largest mmap threshold) with a
# fresh mmap, so each step the kernel faults them in and zeroes them 4 KiB at a time: at
# E=128, D=384, H=1536 that is 150k page faults, more time than the matmuls that fill them.
# Asking for huge pages (madvise) cuts the fault count 512x, but with the common THP setting
# defrag=madvise a fault may then compact memory synchronously: on our benchmark machine that
# made some steps 2x slower instead of faster. So the advice is opt-in: SOFTMOE_HUGEPAGES=1.
# (Glibc can also be told to keep and reuse freed memory: MALLOC_MMAP_MAX_=0 with a large
# MALLOC_TRIM_THRESHOLD_; see the benchmark notes in README.md.)
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


class _ExpertsMLP(torch.autograd.Function):
    """y = gelu_tanh(x w1 + b1) w2 + b2 per expert: (x (E, M, D), w1, b1, w2, b2, train) -> y (E, M, D).

    Why not plain autograd (which keeps h and gelu(h), both (E, M, H), until the backward ends):
      - the hidden activation gelu(h) is recomputed from h in the backward, in h's own buffer,
        and h is released as soon as it is used, so the backward holds one (E, M, H) buffer
        besides the two new weight gradients (plain autograd: three);
      - without `train` (no graph will be built) the GELU runs in place on h;
      - the two weight gradients are written straight into huge-page buffers (`fresh_buffer`).
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, train):
        E, M, _ = x.shape
        h = torch.baddbmm(b1.unsqueeze(1), x, w1, out=fresh_buffer((E, M, w1.shape[2]), x))  # (E, M, H)
        if not train:
            return torch.baddbmm(b2.unsqueeze(1), torch.ops.aten.gelu_(h, approximate="tanh"), w2)
        y = torch.baddbmm(b2.unsqueeze(1), F.gelu(h, approximate="tanh"), w2)  # (E, M, D)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(x, w1, b1, w2, h)
        else:
            # h lives on ctx rather than in save_for_backward so that the backward can free it
            # (and overwrite it) early; a second backward (retain_graph) recomputes it.
            ctx.save_for_backward(x, w1, b1, w2)
            ctx.h = h
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w1, b1, w2, *saved_h = ctx.saved_tensors
        h = saved_h[0].clone() if saved_h else getattr(ctx, "h", None)  # ours to overwrite
        ctx.h = None
        if h is None:  # backward through this node again (retain_graph=True)
            h = torch.baddbmm(b1.unsqueeze(1), x, w1)
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        gx = gw1 = gb1 = gw2 = gb2 = None
        gh = None
        if need_x or need_w1 or need_b1:
            gh = torch.bmm(gy, w2.transpose(1, 2), out=fresh_buffer(h.shape, h))  # (E, M, H) dL/da
            # dL/dh written over dL/da (an elementwise kernel may write over its input)
            gh = torch.ops.aten.gelu_backward.grad_input(gh, h, approximate="tanh", grad_input=gh)
        if need_b2:
            gb2 = gy.sum(1)  # (E, D)
        if need_w2:
            a = torch.ops.aten.gelu_(h, approximate="tanh")  # (E, M, H) recomputed, over h
            gw2 = torch.bmm(a.transpose(1, 2), gy, out=fresh_buffer(w2.shape, w2))  # (E, H, D)
            del a
        del h  # before the second weight gradient is allocated: lowers the peak
        if gh is not None:
            if need_b1:
                gb1 = gh.sum(1)  # (E, H)
            if need_w1:
                gw1 = torch.bmm(x.transpose(1, 2), gh, out=fresh_buffer(w1.shape, w1))  # (E, D, H)
            if need_x:
                gx = torch.bmm(gh, w1.transpose(1, 2))  # (E, M, D)
        return gx, gw1, gb1, gw2, gb2, None


class Experts(nn.Module):
    """`y[e] = W2_e gelu_tanh(W1_e x[e] + b1_e) + b2_e` for every expert e at once.

    Parameters (named as the official checkpoints' layout, transposed to (in, out)):
      w1 (E, D, H), b1 (E, H), w2 (E, H, D), b2 (E, D).

    forward(x: (E, M, D)) -> (E, M, D). Expert parallelism wraps or replaces this module;
    routing code never looks inside it.

    expert_init:
      "identical" (vmoe's default, `split_rngs=False`): every expert starts from the same
        xavier-uniform kernels; routing differences break the symmetry during training.
      "distinct": each expert's kernels drawn independently.

    Speed/memory: for float32/float64 input of the weights' dtype outside autocast, forward
    and backward run as one autograd node (`_ExpertsMLP`: recomputed GELU, early-freed hidden
    activation, huge-page weight gradients); first-order gradients only. `fused = False`
    selects plain autograd (double backward works there).
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, expert_init: str = "identical",
                 bias_init_std: float = 1e-6) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.dim = check_positive_int("dim", dim)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.expert_init = check_choice("expert_init", expert_init, EXPERT_INITS)
        self.bias_init_std = bias_init_std
        # False: plain autograd (supports double backward); True: `_ExpertsMLP` where it applies
        # (float32/float64, one dtype, no autocast), faster and lighter, first-order only.
        self.fused = True
        E, D, H = num_experts, dim, hidden_dim
        self.w1 = nn.Parameter(torch.empty(E, D, H))
        self.b1 = nn.Parameter(torch.empty(E, H))
        self.w2 = nn.Parameter(torch.empty(E, H, D))
        self.b2 = nn.Parameter(torch.empty(E, D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        with torch.no_grad():
            for w in (self.w1, self.w2):
                fan_in, fan_out = w.shape[1], w.shape[2]
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform per expert
                if self.expert_init == "identical":
                    w.copy_(torch.empty_like(w[0]).uniform_(-bound, bound).expand_as(w))
                else:
                    w.uniform_(-bound, bound)
            for b in (self.b1, self.b2):
                b.normal_(0.0, self.bias_init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (E, M, D)
        if (self.fused and x.dtype in (torch.float32, torch.float64) and x.dtype == self.w1.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            train = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
            return _ExpertsMLP.apply(x, self.w1, self.b1, self.w2, self.b2, train)
        h = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)  # (E, M, H)
        h = F.gelu(h, approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (E, M, D)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"expert_init={self.expert_init!r}")
