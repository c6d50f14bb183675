"""Soft MoE's fused routing and combine (the fast path of `SoftRouter`): the same numbers as
the separable steps of softmoe/layers/functional.py (bit for bit in the forward), as two
autograd nodes with hand-written backwards that keep less and reuse the router's buffers.

Einsum letters: B batch, N tokens, D width, E experts, P slots per expert, S = E*P slots.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ...kernels import combine_backward, routing_dx_dw
from .. import functional as reference  # the separable steps this file computes in one node each
from .buffers import pooled_empty, pooled_scratch


class FusedSoftRouting(torch.autograd.Function):
    """(x (B, N, D), w (D, S), mask, noise, normalize, E, P, pool, matmul_dtype) -> slots
    (E, P*B, D), dispatch (B, N, S) (for metrics only, not differentiable), combine (B, N, S).

    x and w in one dtype, float32 or float64, with autocast off (the router casts and turns it
    off: under autocast this whole node is the float32 routing). `matmul_dtype` (None, or the
    autocast dtype for `logits_dtype="autocast"`): the operand dtype of the two matmuls of
    the logits `x w` and of their two backward matmuls (dx through the logits, and dw), whose
    products are cast back, exactly as autograd through `soft_logits(..., matmul_dtype)`.

    The forward computes exactly `soft_logits` + `soft_dispatch` / `soft_combine` +
    `dispatch_tokens`, writing the slots straight into slot-major layout. The backward,
    written out by hand, differs from what autograd would record in what it keeps and how
    many passes it makes over (B, N, D) tensors:
      - it saves only x, w, the clean logits, r, and the two weight tensors (no normalised
        copy of x, no squared x);
      - the three contributions to dx (through the dispatch, the logits and the
        normalisation factor r) and dw come from one last pass, `softmoe.kernels.routing_dx_dw`
        (a compiled kernel that reads x once for few slots, else bmm, addmm_ and addcmul_ into
        one buffer, then mm for dw);
      - both softmax backwards accumulate in place into one (B, N, S) buffer.
    Buffers, from the router's `BufferPool` (None: all fresh): the slots (role "slots"); in
    the backward, dL/dx (role "dx"), and dL/dlogits and one (B, N, S) temporary as scratch in
    the then dead "slots" and "g_ys" buffers.
    Gradients (g = dL/dlogits, over the noisy softmax inputs):
      g      = Dw * (gDw - sum_n Dw*gDw) + Cw * (gCw - sum_s Cw*gCw)
      dx     = Dw gXs + (g r) w^T - r^2 * sum_s(g * logits) * x      (logits = r * x w)
      dw     = x^T (g r)
    """

    @staticmethod
    def forward(ctx, x, w, mask, noise, normalize, E, P, pool, matmul_dtype):
        B, _, D = x.shape
        logits, r = reference.soft_logits(x, w, normalize, matmul_dtype)  # (B, N, S), (B, N, 1) | None
        noisy = logits if noise is None else logits + noise
        m = None if mask is None else mask.unsqueeze(-1)  # (B, N, 1)
        dispatch = reference.soft_dispatch(noisy, m)  # (B, N, S)
        combine = reference.soft_combine(noisy, m)  # (B, N, S)
        slots = bmm_slot_major(dispatch.transpose(1, 2), x, pooled_empty(pool, "slots", (E, P * B, D), x))
        ctx.save_for_backward(x, w, logits, r, dispatch, combine)
        ctx.pool, ctx.matmul_dtype = pool, matmul_dtype
        ctx.mark_non_differentiable(dispatch)
        ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, not zeros
        return slots, dispatch, combine

    @staticmethod
    @once_differentiable
    def backward(ctx, g_slots, g_dispatch, g_combine):
        x, w, logits, r, dispatch, combine = ctx.saved_tensors
        B, N, D = x.shape
        S = w.shape[1]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        pool = ctx.pool
        # dL/dlogits (B, N, S), accumulated in place, and a buffer for products that are summed
        # at once: scratch in the slots' and dL/dys' buffers, both dead by now.
        g = pooled_scratch(pool, "slots", (B, N, S), x)
        tmp = pooled_scratch(pool, "g_ys", (B, N, S), x)
        dx = None
        low = ctx.matmul_dtype
        # dx and dw in one pass at the end (`routing_dx_dw`) when the dispatch term is there and
        # the logits matmul ran in x's dtype; else term by term below
        last_pass = g_slots is not None and need_x and (low is None or low == x.dtype)
        if g_slots is not None:
            g_xs = reference.slot_view(g_slots, B, S)  # (B, S, D)
            g = torch.bmm(x, g_xs.transpose(1, 2), out=g)  # (B, N, S) dL/dDw
            g.sub_(torch.mul(dispatch, g, out=tmp).sum(1, keepdim=True)).mul_(dispatch)  # softmax over N
            if need_x and not last_pass:
                dx = torch.bmm(dispatch, g_xs, out=pooled_empty(pool, "dx", x.shape, x))  # (B, N, D)
        if g_combine is not None:  # through the softmax over S
            s_c = torch.mul(combine, g_combine, out=tmp).sum(-1, keepdim=True)  # (B, N, 1)
            g = torch.mul(combine, g_combine, out=g) if g_slots is None else g.addcmul_(combine, g_combine)
            g.addcmul_(combine, s_c, value=-1.0)
        elif g_slots is None:
            return None, None, None, None, None, None, None, None, None
        if r is not None:
            g.mul_(r)  # dL/d(x w)
        if last_pass:
            # through r: r^2 sum_s(dL/dlogits * logits) = r sum_s(dL/d(x w) * logits)
            c = None if r is None else torch.mul(g, logits, out=tmp).sum(-1, keepdim=True) * r  # (B, N, 1)
            dx, dw = routing_dx_dw(x, dispatch, g, g_xs, w, c, out=pooled_empty(pool, "dx", x.shape, x))
            return dx, (dw.to(w.dtype) if need_w else None), None, None, None, None, None, None, None
        if low is None or low == x.dtype:
            gm, xm, wm = g.reshape(B * N, S), x.reshape(B * N, D), w
        else:  # the logits matmul's operands were cast to `low`: so are its backward's
            gm, xm, wm = g.reshape(B * N, S).to(low), x.reshape(B * N, D).to(low), w.to(low)
        # dw (D, S) as the transpose of g^T x: MKL computes that orientation faster here
        dw = torch.mm(gm.t(), xm).t().to(w.dtype) if need_w else None
        if need_x:
            if dx is None:
                dx = torch.mm(gm, wm.t()).to(x.dtype).view(B, N, D)
            elif gm.dtype == dx.dtype:
                dx.view(B * N, D).addmm_(gm, wm.t())
            else:
                dx.view(B * N, D).add_(torch.mm(gm, wm.t()))
            if r is not None:  # through r: r^2 sum_s(dL/dlogits * logits) = r sum_s(dL/d(x w) * logits)
                dx.addcmul_(x, torch.mul(g, logits, out=tmp).sum(-1, keepdim=True) * r, value=-1.0)
        return dx, dw, None, None, None, None, None, None, None


class FusedCombine(torch.autograd.Function):
    """(ys (E, P*B, D), combine (B, N, S), pool) -> y (B, N, D) = combine ys per sequence.

    Exactly `combine_slots`, but y and dL/dys (which the expert backward reads in place)
    come from the router's `BufferPool` (roles "y", "g_ys"; None: fresh), and dL/dys is
    written straight into slot-major layout, in one pass over dL/dy with dL/dcombine
    (`softmoe.kernels.combine_backward`).
    """

    @staticmethod
    def forward(ctx, ys, combine, pool):
        B, N, S = combine.shape
        y = torch.bmm(combine, reference.slot_view(ys, B, S), out=pooled_empty(pool, "y", (B, N, ys.shape[2]), ys))
        ctx.save_for_backward(ys, combine)
        ctx.pool = pool
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        ys, combine = ctx.saved_tensors
        B, _, S = combine.shape
        g_ys = pooled_empty(ctx.pool, "g_ys", ys.shape, ys) if ctx.needs_input_grad[0] else None  # (E, P*B, D)
        # dL/dys = combine^T gy written into slot-major g_ys, dL/dcombine = gy ys^T (B, N, S)
        g_combine = combine_backward(gy, combine, reference.slot_view(ys, B, S),
                                     None if g_ys is None else reference.slot_view(g_ys, B, S), ctx.needs_input_grad[1])
        return g_ys, g_combine, None


def bmm_slot_major(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`a @ b` (B, S, D) per sequence written into slot-major `out` (E, P*B, D), returned."""
    torch.bmm(a, b, out=reference.slot_view(out, a.shape[0], a.shape[1]))
    return out
