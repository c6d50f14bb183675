"""The experts' fused path (the fast path of `Experts`, softmoe/layers/experts.py): the same
MLP with a GELU (exact or tanh), one autograd node with a hand-written backward, matmuls
through `softmoe.kernels`, buffers from the experts' own `BufferPool`.

Einsum letters: E experts, M items per expert, D model width, H expert hidden width.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...kernels import bmm_nn, bmm_nt, bmm_tn
from .buffers import BufferPool, pooled_empty, pooled_scratch


class ExpertsMLP(torch.autograd.Function):
    """y = gelu(x w1 + b1) w2 + b2 per expert (GELU `approximate` "tanh" or "none"):
    (x (E, M, D), w1, b1, w2, b2, approximate, pool) -> y (E, M, D). Called only when a graph is recorded
    (a training step); `inference` is the no-graph forward.

    Why not plain autograd: it keeps the same two (E, M, H) activations (h and a = gelu(h))
    but allocates every buffer afresh and holds a third one, dL/da, beside dL/dh. Here:
      - every activation is saved with `save_for_backward` (so `saved_tensors_hooks`,
        `save_on_cpu` and activation checkpointing see them);
      - the backward writes dL/dh over the h it unpacks, unless the graph is retained
        (retain_graph=True, create_graph, gradcheck): then dL/dh is a new tensor and a
        second backward reads the h it saved;
      - buffers come from the pool (None: all fresh), so that a training step faults in no
        new pages: roles "h", "a", "w1_grad", "w2_grad" (see `buffers`); dL/da is scratch in
        the "w1_grad" buffer, dead once dL/dh is computed, before dw1 is written there.
    First-order gradients only (impl="reference" for double backward).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate, pool):
        E, M, _ = x.shape
        H = w1.shape[2]
        h = bmm_nn(x, w1, b1, out=pooled_empty(pool, "h", (E, M, H), x))  # (E, M, H)
        a = torch.ops.aten.gelu.out(h, approximate=approximate, out=pooled_empty(pool, "a", (E, M, H), x))
        y = bmm_nn(a, w2, b2)  # (E, M, D)
        ctx.save_for_backward(x, w1, w2, h, a)
        ctx.pool, ctx.approximate = pool, approximate
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, w1, w2, h, a = ctx.saved_tensors
        pool = ctx.pool
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gx = gw1 = gb1 = gw2 = gb2 = None
        if need_w2:
            gw2 = bmm_tn(a, gy, out=pooled_empty(pool, "w2_grad", w2.shape, w2))  # (E, H, D)
        del a
        if need_b2:
            gb2 = gy.sum(1)  # (E, D)
        if need_x or need_w1 or need_b1:
            ga = bmm_nt(gy, w2, out=pooled_scratch(pool, "w1_grad", h.shape, h))  # (E, M, H) dL/da
            if _graph_kept():
                gh = torch.ops.aten.gelu_backward(ga, h, approximate=ctx.approximate)  # (E, M, H) dL/dh
            else:  # written over h (an elementwise kernel may write over its input)
                gh = torch.ops.aten.gelu_backward.grad_input(ga, h, approximate=ctx.approximate, grad_input=h)
            del ga, h
            if need_b1:
                gb1 = gh.sum(1)  # (E, H)
            if need_w1:
                gw1 = bmm_tn(x, gh, out=pooled_empty(pool, "w1_grad", w1.shape, w1))  # (E, D, H)
            if need_x:
                gx = bmm_nt(gh, w1)  # (E, M, D)
        return gx, gw1, gb1, gw2, gb2, None, None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True): saved tensors may be
    read again. True where torch cannot tell (private API, long-standing)."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else keep()


# Inference runs the experts in groups whose hidden activation stays this small: one buffer,
# allocated once per call and warm in cache, instead of an (E, M, H) one (100 MiB at E=512
# of the paper's S/16 layer) whose fresh pages cost more than the GELU that fills them.
INFERENCE_HIDDEN_BYTES = 8 << 20


def inference(x, w1, b1, w2, b2, approximate: str = "tanh") -> torch.Tensor:
    """The no-graph forward (E, M, D) -> (E, M, D), GELU in place, `INFERENCE_HIDDEN_BYTES`
    of hidden activation at a time."""
    E, M, _ = x.shape
    H = w1.shape[2]
    group = max(1, min(E, INFERENCE_HIDDEN_BYTES // max(1, M * H * x.element_size())))
    if group >= E:
        h = bmm_nn(x, w1, b1)  # (E, M, H)
        return bmm_nn(torch.ops.aten.gelu_(h, approximate=approximate), w2, b2)
    y = x.new_empty(E, M, w2.shape[2])  # (E, M, D)
    h = x.new_empty(group, M, H)
    for e in range(0, E, group):  # E / group iterations (4 at the paper's S/16 with E=128)
        g = slice(e, min(E, e + group))
        he = bmm_nn(x[g], w1[g], b1[g], out=h[: g.stop - e])
        bmm_nn(torch.ops.aten.gelu_(he, approximate=approximate), w2[g], b2[g], out=y[g])
    return y


def experts_forward(x: torch.Tensor, w1, b1, w2, b2, approximate: str, pool: BufferPool | None,
                    train: bool) -> torch.Tensor:
    """The experts' MLP on x (E, M, D): `ExpertsMLP` with `pool` when `train` (a graph is
    recorded), else `inference`."""
    if train:
        return ExpertsMLP.apply(x, w1, b1, w2, b2, approximate, pool)
    return inference(x, w1, b1, w2, b2, approximate)
