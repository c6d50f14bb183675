"""The layers' math, one function per step, as plain autograd (the reference that the fused
paths in `softmoe.layers.fused` compute faster; docs/design.md §1).

Every module of `softmoe.layers` and of `softmoe.layers.fused` takes its steps from here, so
the algorithm is written once and nothing imports a layer to reach a step.

Einsum letters: B batch (one routing group per sequence), N tokens, D width, E experts,
P slots per expert, S = E*P slots, M items per expert, H expert hidden width.

Soft MoE's slots are stored slot-major, (S, B, D) = (E, P*B, D): expert e's items are its P
slots of every sequence, item p*B + b being slot (e, p) of sequence b. In that layout the
expert input and output are contiguous, and the (B, S, D) views the dispatch and combine
matmuls need are strided views of the same memory (`slot_view`): no copy between the steps.
"""
from __future__ import annotations

import torch


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """`x * rsqrt(sum(x**2) + eps)`: the eps sits inside the rsqrt, as in vmoe."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


def soft_logits(x: torch.Tensor, w: torch.Tensor, normalize: bool,
                matmul_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits = rsqrt(|x|^2 + 1e-6) * (x @ w)` (B, N, S) and that factor r (B, N, 1) (None
    without normalisation), for x (B, N, D) and slot weights w (D, S) in one dtype.

    Algebraically `l2_normalize(x) @ w`, but the per-token factor is applied to the (B, N, S)
    logits instead of materialising a normalised copy of x (B, N, D), and |x|^2 comes from
    one fused reduction (vector_norm) instead of a squared copy of x.

    `matmul_dtype` (e.g. bfloat16; None: x's dtype): the dtype of the operands of `x @ w`
    only (the router's `logits_dtype="autocast"`); the product is cast back to x's dtype
    before r and everything after it (docs/design.md §1.3)."""
    if matmul_dtype is None or matmul_dtype == x.dtype:
        logits = torch.matmul(x, w)  # (B, N, S)
    else:
        logits = torch.matmul(x.to(matmul_dtype), w.to(matmul_dtype)).to(x.dtype)
    if not normalize:
        return logits, None
    r = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() + 1e-6)  # (B, N, 1)
    return logits * r, r


def soft_dispatch(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the N tokens (dim 1) of logits (B, N, S); masked tokens (m: (B, N, 1)
    bool) get exact zeros, and an all-masked sequence no weight at all."""
    dl = logits if m is None else logits.masked_fill(~m, torch.finfo(logits.dtype).min)
    dispatch = torch.softmax(dl, dim=1)
    return dispatch if m is None else dispatch * m


def soft_combine(logits: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Softmax over all E*P slots jointly (last dim) of logits (B, N, S); masked tokens get
    all-zero rows, so they output exactly zero."""
    combine = torch.softmax(logits, dim=-1)
    return combine if m is None else combine * m


def slot_view(slots: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """The (B, S, D) view (strided, no copy) of slot-major (E, P*B, D) slots; a copy only when
    `slots` is not contiguous (an experts module, e.g. a wrapper, may hand those back)."""
    return slots.reshape(S, B, slots.shape[2]).transpose(0, 1)


def dispatch_tokens(x: torch.Tensor, dispatch: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Slots (E, P*B, D), item p*B + b being slot p of sequence b, from x (B, N, D) and
    dispatch weights (B, N, S): every slot a weighted sum of its sequence's tokens, computed
    in the wider of the two dtypes (float32 routing weights are never rounded to bf16)."""
    B, _, D = x.shape
    S = dispatch.shape[2]
    dtype = torch.promote_types(x.dtype, dispatch.dtype)
    slots = torch.bmm(dispatch.to(dtype).transpose(1, 2), x.to(dtype))  # (B, S, D)
    return slots.transpose(0, 1).reshape(num_experts, S // num_experts * B, D)


def combine_slots(ys: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
    """y (B, N, D) from expert outputs (E, P*B, D) and combine weights (B, N, S): every token a
    weighted sum of all slot outputs of its sequence, computed in the wider of the two dtypes."""
    B, _, S = combine.shape
    dtype = torch.promote_types(ys.dtype, combine.dtype)
    return torch.bmm(combine.to(dtype), slot_view(ys.to(dtype), B, S))  # (B, N, D)


def expert_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               act, drop1=None, drop2=None) -> torch.Tensor:
    """`y[e] = drop2(W2_e drop1(act(W1_e x[e] + b1_e)) + b2_e)` for x (E, M, D), w1 (E, D, H),
    b1 (E, H), w2 (E, H, D), b2 (E, D) -> (E, M, D); `act`, `drop1`, `drop2` callables (None:
    no dropout)."""
    h = act(torch.baddbmm(b1.unsqueeze(1), x, w1))  # (E, M, H)
    if drop1 is not None:
        h = drop1(h)
    y = torch.baddbmm(b2.unsqueeze(1), h, w2)  # (E, M, D)
    return y if drop2 is None else drop2(y)
