"""E expert MLPs as one stacked weight set, applied with two batched matmuls.

The matmuls go through `softmoe.kernels` (`bmm_nn`, `bmm_nt`, `bmm_tn`): torch's batched
matmuls, or on AVX-512 CPUs, where there are few rows per expert and large weights, compiled
kernels that are faster there.

Einsum letters: E experts, M items per expert (slots or capacity buffer), D model width,
H expert hidden width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..kernels import bmm_nn, bmm_nt, bmm_tn
from .buffers import BufferPool, pooled_empty, pooled_scratch, records_graph, step_pool
from .common import check_choice, check_positive_int

EXPERT_INITS = ("identical", "distinct")


class _ExpertsMLP(torch.autograd.Function):
    """y = gelu_tanh(x w1 + b1) w2 + b2 per expert:
    (x (E, M, D), w1, b1, w2, b2, train, pool) -> y (E, M, D).

    Why not plain autograd: it keeps the same two (E, M, H) activations (h and a = gelu(h))
    but allocates every buffer afresh and holds a third one, dL/da, beside dL/dh. Here:
      - the backward writes dL/dh over h (h is ours: it is kept on ctx, not saved);
      - without `train` (no graph will be built) the GELU runs in place on h, and h is
        computed a few experts at a time (`_inference`).
    Buffers come from the module's `BufferPool` (None: all fresh), so that a training step
    faults in no new pages and holds no more memory at its peak (both weight gradients and
    h, while dw1 is written) than without the pool:
      - roles "h", "w1_grad", "w2_grad": last step's buffers, reused once unreferenced;
      - a, kept from the forward until dw2 is computed (the first thing the backward does),
        is scratch in the "w1_grad" buffer, which is free during the forward when the loop
        set the grads to None (`optimizer.zero_grad()`; otherwise a gets a buffer of its
        own); so is dL/da, dead once dL/dh is computed, before dw1 is written there.
    First-order gradients only.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, train, pool):
        E, M, _ = x.shape
        H = w1.shape[2]
        if not train:
            return _inference(x, w1, b1, w2, b2)
        h = bmm_nn(x, w1, b1, out=pooled_empty(pool, "h", (E, M, H), x))  # (E, M, H)
        a = pooled_scratch(pool, "w1_grad", (E, M, H), x)
        a = F.gelu(h, approximate="tanh") if a is None else torch.ops.aten.gelu.out(h, approximate="tanh", out=a)
        y = bmm_nn(a, w2, b2)  # (E, M, D)
        if torch.compiler.is_compiling():
            ctx.save_for_backward(x, w1, b1, w2, h, a)
        else:
            # h and a live on ctx rather than in save_for_backward so that the backward can
            # free a early and overwrite h; a second backward (retain_graph) recomputes them.
            ctx.save_for_backward(x, w1, b1, w2)
            ctx.h, ctx.a = h, a
        ctx.pool = pool
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w1, b1, w2, *saved = ctx.saved_tensors
        if saved:  # compiled: h and a belong to autograd
            (h, a), own_h = saved, False
        else:
            h, a, own_h = getattr(ctx, "h", None), getattr(ctx, "a", None), True
            ctx.h = ctx.a = None
            if h is None:  # backward through this node again (retain_graph=True)
                h = bmm_nn(x, w1, b1)
                a = F.gelu(h, approximate="tanh")
        pool = ctx.pool
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gx = gw1 = gb1 = gw2 = gb2 = None
        if need_w2:
            gw2 = bmm_tn(a, gy, out=pooled_empty(pool, "w2_grad", w2.shape, w2))  # (E, H, D)
        del a  # frees the scratch in the "w1_grad" buffer
        if need_b2:
            gb2 = gy.sum(1)  # (E, D)
        if need_x or need_w1 or need_b1:
            ga = bmm_nt(gy, w2, out=pooled_scratch(pool, "w1_grad", h.shape, h))  # dL/da
            # dL/dh (E, M, H), written over h (an elementwise kernel may write over its input)
            gh = torch.ops.aten.gelu_backward.grad_input(ga, h, approximate="tanh", grad_input=h if own_h else ga)
            del ga, h
            if need_b1:
                gb1 = gh.sum(1)  # (E, H)
            if need_w1:
                gw1 = bmm_tn(x, gh, out=pooled_empty(pool, "w1_grad", w1.shape, w1))  # (E, D, H)
            if need_x:
                gx = bmm_nt(gh, w1)  # (E, M, D)
        return gx, gw1, gb1, gw2, gb2, None, None


# Inference runs the experts in groups whose hidden activation stays this small: one buffer,
# allocated once per call and warm in cache, instead of an (E, M, H) one (100 MiB at E=512
# of the paper's S/16 layer) whose fresh pages cost more than the GELU that fills them.
_INFERENCE_HIDDEN_BYTES = 8 << 20


def _inference(x, w1, b1, w2, b2) -> torch.Tensor:
    """The no-graph forward, `_INFERENCE_HIDDEN_BYTES` of hidden activation at a time."""
    E, M, _ = x.shape
    H = w1.shape[2]
    group = max(1, min(E, _INFERENCE_HIDDEN_BYTES // max(1, M * H * x.element_size())))
    if group >= E or torch.compiler.is_compiling():
        h = bmm_nn(x, w1, b1)  # (E, M, H)
        return bmm_nn(torch.ops.aten.gelu_(h, approximate="tanh"), w2, b2)
    y = x.new_empty(E, M, w2.shape[2])  # (E, M, D)
    h = x.new_empty(group, M, H)
    for e in range(0, E, group):  # E / group iterations (4 at the paper's S/16 with E=128)
        g = slice(e, min(E, e + group))
        he = bmm_nn(x[g], w1[g], b1[g], out=h[: g.stop - e])
        bmm_nn(torch.ops.aten.gelu_(he, approximate="tanh"), w2[g], b2[g], out=y[g])
    return y


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
    and backward run as one autograd node (`_ExpertsMLP`, hand-written backward);
    first-order gradients only. `fused = False` selects plain autograd (double backward
    works there).

    Buffer reuse (CPU, training steps; inference keeps nothing): that node takes its hidden
    activation and the weight gradients from `self.buffer_pool` (`BufferPool` in
    `softmoe.layers.buffers`), which hands last step's buffers back once nothing references
    them any more, e.g. after `optimizer.zero_grad()`. Without it every step faults in and
    zeroes fresh pages (576 MiB per step at the paper's S/16 shape with E=128: more time than
    the matmuls that fill them). The price: the pool keeps those buffers between steps. The
    peak of one layer's step does not grow, but in a deep model the kept weight gradients
    are resident during the next forward, as with `zero_grad(set_to_none=False)`, so the
    whole model's peak can grow by up to the experts' weight size. `softmoe.release_buffers(model)`
    frees what the pools keep; `experts.buffer_pool.enabled = False` turns reuse off.
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
        # Reused weight-gradient / backward buffers of the fused path (see the docstring).
        self.buffer_pool = BufferPool()
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
            train = records_graph(x, self)
            pool = step_pool(self.buffer_pool, train)
            return _ExpertsMLP.apply(x, self.w1, self.b1, self.w2, self.b2, train, pool)
        h = torch.baddbmm(self.b1.unsqueeze(1), x, self.w1)  # (E, M, H)
        h = F.gelu(h, approximate="tanh")
        return torch.baddbmm(self.b2.unsqueeze(1), h, self.w2)  # (E, M, D)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"expert_init={self.expert_init!r}")
