"""The Soft MoE layer (Puigcerver et al., ICLR 2024), exactly as vmoe's `SoftRouter` +
`SoftMoE` (SPEC.md §1).

Einsum letters: B batch (one routing group per sequence), N tokens, D width, E experts,
P slots per expert, S = E*P slots, H expert hidden width.

    logits  = router(x)                      # (B, N, S), float32
    Dw      = softmax(logits, over N)        # (B, N, S)  one distribution per slot
    Cw      = softmax(logits, over S)        # (B, N, S)  one distribution per token
    slots   = Dw^T x                         # (B, S, D)  from the UN-normalised x
    ys      = experts(slots as (E, P*B, D))  # (E, P*B, D)
    y       = Cw ys                          # (B, N, D)

Slots are stored slot-major, (S, B, D) = (E, P*B, D): expert e's items are its P slots of
every sequence, item p*B + b being slot (e, p) of sequence b. In that layout the expert input
and output are contiguous and the (B, S, D) views the dispatch and combine matmuls need are
strided views of the same memory, so no copy is made between the three steps.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .buffers import BufferPool, pooled_empty, pooled_scratch, records_graph, step_pool
from .common import MoELayer, check_choice, check_input, check_nonneg_float, check_positive_int
from .experts import Experts
from .router import SoftRouter, soft_logits

WEIGHT_MODES = ("soft", "uniform", "identity")


class SoftMoE(MoELayer):
    """Soft MoE: a drop-in replacement for a transformer MLP.

    Args:
      dim: model width D.
      num_experts: E.
      slots_per_expert: P (the paper uses 1; the slot count does not change with N).
      hidden_dim: expert hidden width H (default 4*dim, the ViT MLP ratio).
      noise_std: std of Gaussian noise added to the logits in training only (default 0, as
        every paper run).
      dispatch, combine: "soft" (the paper), "uniform" (Table 2 ablations: every slot is the
        mean of the tokens / every token the mean of the slot outputs) or "identity" (token i
        -> slot i; needs N == E*P).
      expert_init: "identical" (vmoe) or "distinct", see `Experts`.
      normalize: l2-normalise tokens and phi before the logits (the official code: True).

    forward(x: (B, N, D), mask: (B, N) bool | None) -> (B, N, D)

    Padding mask (True = real token): masked tokens get exactly zero dispatch weight, so
    slots are convex combinations of real tokens only, and a zero output. A sequence whose
    tokens are all masked gets all-zero slots, zero output and zero gradient; it never
    produces NaN.

    Speed: with soft dispatch and combine, float32/float64 input and no autocast, the forward
    runs logits, both softmaxes and the dispatch as one autograd node (`_FusedSoftRouting`)
    whose backward accumulates the three input-gradient terms into one buffer, and the
    combine as another (`_FusedCombine`). They compute the same numbers as the separable
    steps below (bit for bit in the forward). The experts have their own fused node (see
    `Experts`). All support first-order gradients only; set
    `layer.fused = layer.experts.fused = False` for double backward (plain autograd).
    On CPU these nodes reuse last step's buffers (slots, output, dL/dys, dL/dx) through the
    pool they share with the experts (`layer.buffer_pool`, see `Experts`);
    `softmoe.release_buffers(model)` frees what the pools keep between steps.

    NaN/Inf: like any MLP, a non-finite token propagates (through the softmax over N it
    reaches every output token of its own sequence, never other sequences); this holds for
    masked positions too (0 * NaN = NaN), so fill padding with finite values. Set
    `check_finite=True` for an explicit ValueError instead (a data-dependent check; off by
    default to keep the hot path free of device syncs).
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None,
                 noise_std: float = 0.0, dispatch: str = "soft", combine: str = "soft",
                 expert_init: str = "identical", normalize: bool = True, check_finite: bool = False) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        check_positive_int("hidden_dim", hidden_dim)
        self.noise_std = check_nonneg_float("noise_std", noise_std)
        self.dispatch = check_choice("dispatch", dispatch, WEIGHT_MODES)
        self.combine = check_choice("combine", combine, WEIGHT_MODES)
        self.check_finite = check_finite
        self.num_slots = num_experts * slots_per_expert
        self.fused = True  # see "Speed" above
        self.router = SoftRouter(dim, num_experts, slots_per_expert, normalize=normalize)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init)
        # Reused output / input-gradient buffers of the fused path (see "Speed" above), one
        # pool with the experts' (theirs are dead when dx is computed: dx may reuse h's).
        self.buffer_pool = self.experts.buffer_pool

    # -- routing -------------------------------------------------------------------------
    def routing_weights_for(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Dispatch and combine weights, each (B, N, S) in routing dtype (float32+)."""
        B, N, _ = x.shape
        S = self.num_slots
        needs_logits = "soft" in (self.dispatch, self.combine)
        logits = self.router(x) if needs_logits else None  # (B, N, S)
        if logits is not None and self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        dtype = logits.dtype if logits is not None else torch.promote_types(x.dtype, torch.float32)
        if "identity" in (self.dispatch, self.combine) and N != S:
            raise ValueError(f"identity routing needs tokens == num_experts*slots_per_expert = {S}, got {N} tokens")
        m = None if mask is None else mask.unsqueeze(-1)  # (B, N, 1)

        if self.dispatch == "soft":
            dispatch = _soft_dispatch(logits, m)
        elif self.dispatch == "uniform":
            if m is None:
                dispatch = x.new_full((1, 1, 1), 1.0 / N, dtype=dtype).expand(B, N, S)
            else:
                mf = m.to(dtype)
                dispatch = (mf / mf.sum(1, keepdim=True).clamp_min(1)).expand(B, N, S)
        else:
            dispatch = torch.eye(N, dtype=dtype, device=x.device).expand(B, N, S)
            if m is not None:
                dispatch = dispatch * m

        if self.combine == "soft":
            return dispatch, _soft_combine(logits, m)
        if self.combine == "uniform":
            combine = x.new_full((1, 1, 1), 1.0 / S, dtype=dtype).expand(B, N, S)
        else:
            combine = torch.eye(N, dtype=dtype, device=x.device).expand(B, N, S)
        if m is not None:
            combine = combine * m  # masked tokens output exactly zero
        return dispatch, combine

    # -- the three separable steps ---------------------------------------------------------
    def dispatch_tokens(self, x: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
        """slots (E, P*B, D) (item p*B + b: slot p of sequence b) from x (B, N, D) and
        dispatch weights (B, N, S)."""
        B, _, D = x.shape
        slots = torch.bmm(dispatch.to(x.dtype).transpose(1, 2), x)  # (B, S, D)
        return slots.transpose(0, 1).reshape(self.num_experts, self.slots_per_expert * B, D)

    def combine_slots(self, ys: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """y (B, N, D) from expert outputs (E, P*B, D) and combine weights (B, N, S)."""
        return torch.bmm(combine.to(ys.dtype), _slot_view(ys, combine.shape[0]))  # (B, N, D)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        return (self.fused and self.dispatch == "soft" and self.combine == "soft"
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.dim, mask, self.check_finite)
        if self._fused_ok(x):
            # The routing dtype is x's dtype here (float32/float64), as in routing_weights_for.
            noise = None
            if self.training and self.noise_std > 0:
                B, N, _ = x.shape
                noise = self.noise_std * torch.randn(B, N, self.num_slots, dtype=x.dtype, device=x.device)
            pool = step_pool(self.buffer_pool, records_graph(x, self))
            slots, dispatch, combine = _FusedSoftRouting.apply(
                x, self.router.slot_weights(x.dtype), mask, noise, self.router.normalize,
                self.num_experts, self.slots_per_expert, pool)
            y = _FusedCombine.apply(self.experts(slots), combine, pool)
        else:
            dispatch, combine = self.routing_weights_for(x, mask)
            y = self.combine_slots(self.experts(self.dispatch_tokens(x, dispatch)), combine)
        self.aux_loss = None  # Soft MoE needs no auxiliary loss.
        if self.record_metrics:
            self.metrics = _soft_metrics(dispatch, combine, mask)
        if self.record_weights:
            B, N, _ = x.shape
            E, P = self.num_experts, self.slots_per_expert
            self.routing_weights = {"dispatch": dispatch.detach().reshape(B, N, E, P),
                                    "combine": combine.detach().reshape(B, N, E, P)}
        return y

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"noise_std={self.noise_std}, dispatch={self.dispatch!r}, combine={self.combine!r}")


def _soft_dispatch(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the N tokens (dim 1) of logits (B, N, S); masked tokens (m: (B, N, 1)
    bool) get exact zeros, and an all-masked sequence no weight at all."""
    dl = logits if m is None else logits.masked_fill(~m, torch.finfo(logits.dtype).min)
    dispatch = torch.softmax(dl, dim=1)
    return dispatch if m is None else dispatch * m


def _soft_combine(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over all E*P slots jointly (last dim) of logits (B, N, S); masked tokens get
    all-zero rows, so they output exactly zero."""
    combine = torch.softmax(logits, dim=-1)
    return combine if m is None else combine * m


def _slot_view(slots: torch.Tensor, B: int) -> torch.Tensor:
    """The (B, S, D) view (strided, no copy) of slot-major (E, P*B, D) slots."""
    E, M, D = slots.shape
    return slots.view(E * (M // B), B, D).transpose(0, 1)


class _FusedSoftRouting(torch.autograd.Function):
    """(x (B, N, D), w (D, S), mask, noise, normalize, E, P, pool) -> slots (E, P*B, D),
    dispatch (B, N, S) (for metrics only, not differentiable), combine (B, N, S).

    The forward computes exactly `soft_logits` + `_soft_dispatch` / `_soft_combine` +
    `dispatch_tokens` (the separable steps), writing the slots straight into slot-major
    layout. The backward, written out by hand, differs from what autograd would record in
    what it keeps and how many passes it makes over (B, N, D) tensors:
      - it saves only x, w, the clean logits, r, and the two weight tensors (no normalised
        copy of x, no squared x);
      - the three contributions to dx (through the dispatch, the logits and the
        normalisation factor r) accumulate in one buffer (bmm, then addmm_, then addcmul_);
      - both softmax backwards accumulate in place into one (B, N, S) buffer.
    Buffers, from the layer's `BufferPool` (None: all fresh): the slots (role "slots"); in
    the backward, dL/dx in the experts' dead "h" buffer when it fits (else role "dx"), and
    dL/dlogits and one (B, N, S) temporary as scratch in the then dead "slots" and "g_ys"
    buffers. At the paper's S/16 shape that keeps a step's peak at or below the ports'.
    Gradients (g = dL/dlogits, over the noisy softmax inputs):
      g      = Dw * (gDw - sum_n Dw*gDw) + Cw * (gCw - sum_s Cw*gCw)
      dx     = Dw gXs + (g r) w^T - r^2 * sum_s(g * logits) * x      (logits = r * x w)
      dw     = x^T (g r)
    """

    @staticmethod
    def forward(ctx, x, w, mask, noise, normalize, E, P, pool):
        B, _, D = x.shape
        logits, r = soft_logits(x, w, normalize)  # (B, N, S), (B, N, 1) | None
        noisy = logits if noise is None else logits + noise
        m = None if mask is None else mask.unsqueeze(-1)
        dispatch = _soft_dispatch(noisy, m)
        combine = _soft_combine(noisy, m)
        slots = _bmm_slot_major(dispatch.transpose(1, 2), x, pooled_empty(pool, "slots", (E, P * B, D), x))
        ctx.save_for_backward(x, w, logits, r, dispatch, combine)
        ctx.pool = pool
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
        if g_slots is not None:
            g_xs = _slot_view(g_slots, B)  # (B, S, D)
            g = torch.bmm(x, g_xs.transpose(1, 2), out=g)  # (B, N, S) dL/dDw
            g.sub_(torch.mul(dispatch, g, out=tmp).sum(1, keepdim=True)).mul_(dispatch)  # softmax over N
            if need_x:
                dx = torch.bmm(dispatch, g_xs, out=_dx_buffer(pool, x))  # (B, N, D)
        if g_combine is not None:  # through the softmax over S
            s_c = torch.mul(combine, g_combine, out=tmp).sum(-1, keepdim=True)  # (B, N, 1)
            g = torch.mul(combine, g_combine, out=g) if g_slots is None else g.addcmul_(combine, g_combine)
            g.addcmul_(combine, s_c, value=-1.0)
        elif g_slots is None:
            return None, None, None, None, None, None, None, None
        if r is not None:
            g.mul_(r)  # dL/d(x w)
        # dw (D, S) as the transpose of g^T x: MKL computes that orientation about 2x faster here
        dw = torch.mm(g.reshape(B * N, S).t(), x.reshape(B * N, D)).t() if need_w else None
        if need_x:
            if dx is None:
                dx = torch.mm(g.reshape(B * N, S), w.t()).view(B, N, D)
            else:
                dx.view(B * N, D).addmm_(g.reshape(B * N, S), w.t())
            if r is not None:  # through r: r^2 sum_s(dL/dlogits * logits) = r sum_s(dL/d(x w) * logits)
                dx.addcmul_(x, torch.mul(g, logits, out=tmp).sum(-1, keepdim=True) * r, value=-1.0)
        return dx, dw, None, None, None, None, None, None


class _FusedCombine(torch.autograd.Function):
    """(ys (E, P*B, D), combine (B, N, S), pool) -> y (B, N, D) = combine ys per sequence.

    Exactly `combine_slots`, but y and dL/dys (which the expert backward reads in place)
    come from the layer's `BufferPool` (roles "y", "g_ys"; None: fresh), and dL/dys is
    written straight into slot-major layout.
    """

    @staticmethod
    def forward(ctx, ys, combine, pool):
        B, N, _ = combine.shape
        y = torch.bmm(combine, _slot_view(ys, B), out=pooled_empty(pool, "y", (B, N, ys.shape[2]), ys))
        ctx.save_for_backward(ys, combine)
        ctx.pool = pool
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        ys, combine = ctx.saved_tensors
        B = combine.shape[0]
        g_ys = g_combine = None
        if ctx.needs_input_grad[0]:
            g_ys = _bmm_slot_major(combine.transpose(1, 2), gy, pooled_empty(ctx.pool, "g_ys", ys.shape, ys))
        if ctx.needs_input_grad[1]:
            g_combine = torch.bmm(gy, _slot_view(ys, B).transpose(1, 2))  # (B, N, S)
        return g_ys, g_combine, None


def _bmm_slot_major(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`a @ b` (B, S, D) per sequence written into slot-major `out` (E, P*B, D), returned."""
    if torch.compiler.is_compiling():  # graphs take no strided out= (and own their buffers)
        return torch.bmm(a, b).transpose(0, 1).reshape(out.shape)
    torch.bmm(a, b, out=_slot_view(out, a.shape[0]))
    return out


def _dx_buffer(pool: BufferPool | None, x: torch.Tensor) -> torch.Tensor:
    """dL/dx's buffer: when it fits, the experts' "h" buffer, dead by the time the routing
    backward runs (and in use again only at the next forward, when dL/dx has normally been
    consumed; if not, that forward allocates a new h): no buffer kept for dx alone."""
    dx = pooled_scratch(pool, "h", x.shape, x)
    return dx if dx is not None else pooled_empty(pool, "dx", x.shape, x)


@torch.no_grad()
def _soft_metrics(dispatch: torch.Tensor, combine: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """vmoe's SoftRouter metrics: mean over tokens of the min/max combine weight, mean over
    slots of the min/max dispatch weight. Masked tokens are left out of both."""
    if mask is None:
        return {
            "combine_weights_min_mean": combine.amin(-1).mean(),
            "combine_weights_max_mean": combine.amax(-1).mean(),
            "dispatch_weights_min_mean": dispatch.amin(1).mean(),
            "dispatch_weights_max_mean": dispatch.amax(1).mean(),
        }
    m = mask.unsqueeze(-1)
    tok = mask.to(combine.dtype)
    n_tok = tok.sum().clamp_min(1)
    seq_valid = mask.any(1)  # (B,) sequences with a real token
    n_slots = (seq_valid.to(combine.dtype).sum() * dispatch.shape[-1]).clamp_min(1)
    big = torch.finfo(dispatch.dtype).max
    dmin = dispatch.masked_fill(~m, big).amin(1) * seq_valid.unsqueeze(-1)
    dmax = dispatch.masked_fill(~m, 0).amax(1)
    return {
        "combine_weights_min_mean": (combine.amin(-1) * tok).sum() / n_tok,
        "combine_weights_max_mean": (combine.amax(-1) * tok).sum() / n_tok,
        "dispatch_weights_min_mean": dmin.sum() / n_slots,
        "dispatch_weights_max_mean": dmax.sum() / n_slots,
    }
