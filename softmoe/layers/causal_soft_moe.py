"""A causal Soft MoE for decoders: slots anchored inside chunks (docs/design.md §8).

Einsum letters: B batch, T tokens, K = ceil(T/C) chunks, C chunk size, D width, E experts,
P slots per expert, S = E*P slots per chunk.

The sequence is cut into chunks of C tokens. Chunk k has its own S slots; slot s of chunk k
is anchored at a position a_k(s) inside the chunk and mixes only the chunk's tokens up to
its anchor; a token combines only the slots that are complete when it is read: those of its
own chunk anchored at or before it, and all S slots of the previous chunk.

    logits  = router(x)                                  # (B, K, C, S), float32
    Dw      = softmax over j <= a_k(s) in chunk k         # (B, K, C, S)
    slots   = Dw^T x                                     # (B, K, S, D)
    ys      = experts(slots as (E, P*B*K, D))            # S expert evaluations per chunk
    Cw      = softmax over the 2S slots of chunks k-1, k  # (B, K, C, 2S), only completed ones
    y       = Cw [ys_{k-1}; ys_k]                        # (B, T, D)

Precision as Soft MoE's (docs/design.md §1.3): the logits, both masked softmaxes and both
mixing matmuls run in float32 (float64 for float64 input) with autocast off; the slots are
cast to the compute dtype (autocast's under autocast, else x's) for the experts, and the
float32 combine is cast to it once, so under bf16 autocast the output is bf16. `step()`
decodes with the same arithmetic.

Anchors a(s) = floor(s*C/S) (distinct since S <= C; a(0) = 0, so every token has a completed
slot of its own chunk). With `rotate=True` slot s of chunk k takes anchor a((s + k) mod S),
so over S consecutive chunks every expert's slots sit at every anchor: slots are not tied to
positions (the paper's warning, §6). `rotate=False` keeps a fixed assignment (ablation).

Decoding (`init_state` / `step`) keeps, per sequence, an online softmax (running max, sum,
weighted sum) for each open slot of the current chunk, the expert outputs of its completed
slots and of the previous chunk's: state of constant shape (B, S, D) whatever t is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fused
from .common import MoELayer, check_input, check_positive_int, compute_dtype, no_autocast, routing_dtype
from .experts import Experts
from .router import SoftRouter


def slot_anchors(chunk_size: int, num_slots: int) -> torch.Tensor:
    """a(s) = floor(s*C/S) (S,) int64: distinct anchors in [0, C), the first at 0."""
    return torch.arange(num_slots, dtype=torch.int64) * chunk_size // num_slots


@dataclass
class CausalSoftMoEState:
    """Decoding state of one `CausalSoftMoE` for a batch; every tensor's shape is fixed.

    t: tokens consumed so far (a Python int). m, l (B, S): running max / sum of the open
    slots' dispatch softmax; acc (B, S, D): its running weighted sum of tokens; real (B, S):
    the slot holds a real token; ys_cur, ys_prev (B, S, D): expert outputs of the current
    chunk's completed slots / of the previous chunk's slots; ok_prev (B, S): usable slots of
    the previous chunk. owner: id of the layer that made the state."""

    t: int
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741
    acc: torch.Tensor
    real: torch.Tensor
    ys_cur: torch.Tensor
    real_cur: torch.Tensor
    ys_prev: torch.Tensor
    ok_prev: torch.Tensor
    owner: int

    @property
    def batch_size(self) -> int:
        return self.m.shape[0]


class CausalSoftMoE(MoELayer):
    """Exactly causal Soft MoE: a drop-in for a decoder block's MLP.

    Args:
      dim: model width D.
      num_experts: E.
      slots_per_expert: P; S = E*P slots per chunk.
      chunk_size: C >= S tokens per chunk (default S: "slots = tokens", dense MLP FLOPs).
        Each chunk costs S expert evaluations, so the expert FLOPs per token are S/C of an
        MLP of the experts' hidden width.
      hidden_dim: expert hidden width H (default 4*dim).
      rotate: rotate the slot anchors from chunk to chunk (default True; False = ablation).
      expert_init, normalize: as in `SoftMoE`.
      impl: "fused" (default) or "reference", passed on to the experts (the causal routing
        has no fused kernel: it is always the code below).
      logits_dtype: "float32" (default) or "autocast": the operand dtype of the logits matmul
        under autocast, as `SoftMoE`'s (the softmaxes and the mixing stay float32).

    Precision (docs/design.md §1.3, §8): under bf16/fp16 autocast the routing (logits, masked
    softmaxes, dispatch and combine matmuls) runs in float32 and the experts in the autocast
    dtype; the output has the autocast dtype. The same holds for `step()`.

    forward(x: (B, T, D), mask: (B, T) bool | None) -> (B, T, D). y_t depends on x_{<=t}
    only (and on no other sequence). Masked tokens get zero dispatch weight and zero output;
    a slot without a real token is never combined; a token with no usable slot outputs zero.

    Decoding: `state = init_state(B)`, then `y_t, state = step(x_t (B, D), state)` gives the
    parallel forward's y_t (to float rounding) with state of constant size.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, chunk_size: int | None = None,
                 hidden_dim: int | None = None, rotate: bool = True, expert_init: str = "identical",
                 normalize: bool = True, check_finite: bool = False, impl: str = "fused",
                 logits_dtype: str = "float32") -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.slots_per_expert = check_positive_int("slots_per_expert", slots_per_expert)
        self.num_slots = S = num_experts * slots_per_expert
        chunk_size = S if chunk_size is None else chunk_size
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if self.chunk_size < S:
            raise ValueError(f"chunk_size must be >= num_experts*slots_per_expert = {S} (each slot needs its own "
                             f"anchor position inside a chunk), got {chunk_size}")
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        check_positive_int("hidden_dim", hidden_dim)
        if not isinstance(rotate, bool):
            raise ValueError(f"rotate must be a bool, got {rotate!r}")
        self.rotate = rotate
        self.check_finite = check_finite
        self.impl = fused.check_impl(impl)
        self.router = SoftRouter(dim, num_experts, slots_per_expert, normalize=normalize, logits_dtype=logits_dtype)
        self.experts = Experts(num_experts, dim, hidden_dim, expert_init=expert_init, impl=impl)
        self.register_buffer("anchors", slot_anchors(self.chunk_size, S), persistent=False)

    # -- positions ------------------------------------------------------------------------------
    def chunk_anchors(self, num_chunks: int) -> torch.Tensor:
        """(K, S) anchor (position inside the chunk) of slot s of chunk k."""
        S = self.num_slots
        k = torch.arange(num_chunks, device=self.anchors.device).unsqueeze(1)  # (K, 1)
        s = torch.arange(S, device=self.anchors.device).unsqueeze(0)  # (1, S)
        return self.anchors[(s + k) % S] if self.rotate else self.anchors.expand(num_chunks, S)

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Routing logits (..., S) in routing dtype (float32+) for tokens x (..., D): the router's
        (autocast off; its `logits_dtype` decides the logits matmul's operands)."""
        return self.router(x)

    # -- parallel forward -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        check_input(x, self.dim, mask, self.check_finite, dtype=self.router.phi.dtype)
        B, T, D = x.shape
        C, S, E, P = self.chunk_size, self.num_slots, self.num_experts, self.slots_per_expert
        K = -(-T // C)
        pad = K * C - T
        out_dtype = compute_dtype(x)  # the experts' and the output's dtype (autocast's under autocast)
        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask
        if pad:  # padding at the end: future positions, which no real output reads
            x = F.pad(x, (0, 0, 0, pad))
            real = F.pad(real, (0, pad), value=False)
        xc = x.reshape(B, K, C, D)
        realc = real.reshape(B, K, C)
        logits = self.logits_of(xc)  # (B, K, C, S), routing dtype
        anchors = self.chunk_anchors(K)  # (K, S)
        pos = torch.arange(C, device=x.device)
        with no_autocast(x.device.type):  # routing and mixing in routing dtype (docs/design.md §1.3)
            # Dispatch: slot s of chunk k mixes the chunk's real tokens j <= a_k(s).
            allowed = (pos.view(1, C, 1) <= anchors.unsqueeze(1)).unsqueeze(0) & realc.unsqueeze(-1)  # (B,K,C,S)
            dispatch = masked_softmax(logits, allowed, dim=2)  # (B, K, C, S)
            slots = torch.matmul(dispatch.transpose(2, 3), xc.to(logits.dtype))  # (B, K, S, D)
        slot_real = allowed.any(dim=2)  # (B, K, S)
        xs = slots.to(out_dtype).permute(2, 0, 1, 3).reshape(E, P * B * K, D)  # item p*B*K + b*K + k
        ys = self.experts(xs).reshape(S, B, K, D).permute(1, 2, 0, 3)  # (B, K, S, D), autocast dtype
        with no_autocast(x.device.type):
            # Combine: the previous chunk's usable slots, and this chunk's completed usable ones.
            done = (anchors.unsqueeze(1) <= pos.view(1, C, 1)).unsqueeze(0) & slot_real.unsqueeze(2)  # (B,K,C,S)
            prev_ok = F.pad(slot_real, (0, 0, 1, 0), value=False)[:, :K]  # (B, K, S)
            ok = torch.cat([prev_ok.unsqueeze(2).expand(B, K, C, S), done], dim=-1) & realc.unsqueeze(-1)  # (B,K,C,2S)
            combine = masked_softmax(torch.cat([logits, logits], dim=-1), ok, dim=-1)  # (B, K, C, 2S)
            ys_prev = F.pad(ys, (0, 0, 0, 0, 1, 0))[:, :K]  # (B, K, S, D)
            y = torch.matmul(combine, torch.cat([ys_prev, ys], dim=2).to(combine.dtype))  # (B, K, C, D)
        y = y.reshape(B, K * C, D)[:, :T].to(out_dtype)
        self.publish(None,  # no auxiliary loss, as Soft MoE
                     lambda: causal_metrics(dispatch, slot_real, combine, realc),
                     lambda: {"dispatch": dispatch.detach(), "combine": combine.detach()})
        return y

    # -- decoding -------------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> CausalSoftMoEState:
        """An empty decoding state for `batch_size` sequences (tensors on the layer's device)."""
        B = check_positive_int("batch_size", batch_size)
        p = self.router.phi
        device = p.device if device is None else device
        dtype = p.dtype if dtype is None else dtype
        rd = routing_dtype(dtype)
        S, D = self.num_slots, self.dim
        return CausalSoftMoEState(
            t=0, m=torch.full((B, S), float("-inf"), dtype=rd, device=device),
            l=torch.zeros(B, S, dtype=rd, device=device), acc=torch.zeros(B, S, D, dtype=rd, device=device),
            real=torch.zeros(B, S, dtype=torch.bool, device=device),
            ys_cur=torch.zeros(B, S, D, dtype=dtype, device=device),
            real_cur=torch.zeros(B, S, dtype=torch.bool, device=device),
            ys_prev=torch.zeros(B, S, D, dtype=dtype, device=device),
            ok_prev=torch.zeros(B, S, dtype=torch.bool, device=device), owner=id(self))

    def check_state(self, state, x_t: torch.Tensor) -> None:
        if not isinstance(state, CausalSoftMoEState):
            raise ValueError(f"state must be a CausalSoftMoEState from this layer's init_state, got "
                             f"{type(state).__name__}")
        if state.owner != id(self):
            raise ValueError("state was made by another CausalSoftMoE layer (use this layer's init_state)")
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.dim:
            got = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must have shape (batch, dim={self.dim}), got {got}")
        if x_t.shape[0] != state.batch_size:
            raise ValueError(f"state has batch size {state.batch_size} but x_t has {x_t.shape[0]} rows "
                             f"(make a state with init_state({x_t.shape[0]}))")

    @torch.no_grad()
    def step(self, x_t: torch.Tensor, state: CausalSoftMoEState, mask_t: torch.Tensor | None = None):
        """One decoding step: x_t (B, D) (mask_t (B,) bool: real token) -> (y_t (B, D), new state)."""
        self.check_state(state, x_t)
        if mask_t is not None and (not isinstance(mask_t, torch.Tensor) or mask_t.dtype != torch.bool
                                   or tuple(mask_t.shape) != (x_t.shape[0],)):
            raise ValueError(f"mask_t must be a torch.bool tensor of shape ({x_t.shape[0]},)")
        B, D = x_t.shape
        C, E, P = self.chunk_size, self.num_experts, self.slots_per_expert
        out_dtype = compute_dtype(x_t)  # as forward: the experts' and the output's dtype
        k, i = divmod(state.t, C)
        st = state
        if i == 0 and state.t > 0:  # a new chunk: the finished chunk's slots become the previous ones
            st = self.init_state(B, device=x_t.device, dtype=state.ys_cur.dtype)
            st.ys_prev, st.ok_prev = state.ys_cur, state.real_cur
        real_t = torch.ones(B, dtype=torch.bool, device=x_t.device) if mask_t is None else mask_t
        anchors = self.chunk_anchors(k + 1)[k]  # (S,)
        logit = self.logits_of(x_t)  # (B, S), routing dtype
        with no_autocast(x_t.device.type):  # the online softmax in routing dtype, as forward's dispatch
            # Online softmax over the open slots (anchor >= i) that this real token enters.
            enter = (anchors >= i).unsqueeze(0) & real_t.unsqueeze(1)  # (B, S)
            m_new = torch.where(enter, torch.maximum(st.m, logit), st.m)
            fin = torch.isfinite(m_new)
            old = torch.where(fin, torch.exp(st.m - torch.where(fin, m_new, 0)), torch.zeros_like(st.m))
            new = torch.where(enter, torch.exp(logit - torch.where(fin, m_new, 0)), torch.zeros_like(st.m))
            l_new = st.l * old + new
            acc = st.acc * old.unsqueeze(-1) + new.unsqueeze(-1) * x_t.to(st.acc.dtype).unsqueeze(1)  # (B, S, D)
        real = st.real | enter
        # The slot anchored at i (at most one: anchors are distinct) is complete: run the experts.
        closing = anchors == i  # (S,)
        ys_cur, real_cur = st.ys_cur, st.real_cur
        if bool(closing.any()):
            s = int(closing.nonzero()[0, 0])
            slot = torch.where(real[:, s:s + 1], acc[:, s] / l_new[:, s:s + 1].clamp_min(1e-30), 0)  # (B, D)
            xs = x_t.new_zeros(E, P * B, D, dtype=out_dtype)
            e, p = divmod(s, P)
            xs[e, p * B:(p + 1) * B] = slot.to(out_dtype)
            y_s = self.experts(xs)[e, p * B:(p + 1) * B]  # (B, D); the other experts' rows are discarded
            ys_cur = ys_cur.clone()
            ys_cur[:, s] = y_s
            real_cur = real_cur.clone()
            real_cur[:, s] = real[:, s]
        done = (anchors <= i).unsqueeze(0) & real_cur  # (B, S)
        ok = torch.cat([st.ok_prev, done], dim=-1) & real_t.unsqueeze(1)  # (B, 2S)
        with no_autocast(x_t.device.type):  # the combine in routing dtype, as forward's
            w = masked_softmax(torch.cat([logit, logit], dim=-1), ok, dim=-1)  # (B, 2S)
            ys_all = torch.cat([st.ys_prev, ys_cur], dim=1).to(w.dtype)  # (B, 2S, D)
            y = torch.bmm(w.unsqueeze(1), ys_all).squeeze(1).to(out_dtype)  # (B, D)
        out = CausalSoftMoEState(t=state.t + 1, m=m_new, l=l_new, acc=acc, real=real, ys_cur=ys_cur,
                                 real_cur=real_cur, ys_prev=st.ys_prev, ok_prev=st.ok_prev, owner=id(self))
        return y, out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"chunk_size={self.chunk_size}, rotate={self.rotate}, impl={self.impl!r}")


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor, dim: int) -> torch.Tensor:
    """Softmax of `logits` along `dim` over the `allowed` (bool, same shape) entries only, in
    the logits' dtype: excluded entries are exactly 0.0 with exactly zero gradient
    (docs/design.md §8.2), and a row with none allowed is all zeros."""
    neg = torch.finfo(logits.dtype).min
    return torch.softmax(logits.masked_fill(~allowed, neg), dim=dim) * allowed


@torch.no_grad()
def causal_metrics(dispatch: torch.Tensor, slot_real: torch.Tensor, combine: torch.Tensor,
                   real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean over real tokens of the max combine weight and of the number of usable slots; mean
    over slots holding a real token of the max dispatch weight."""
    tok = real.to(combine.dtype)
    n_tok = tok.sum().clamp_min(1)
    sr = slot_real.to(dispatch.dtype)
    return {
        "combine_weights_max_mean": (combine.amax(-1) * tok).sum() / n_tok,
        "combined_slots_mean": ((combine > 0).sum(-1).to(tok.dtype) * tok).sum() / n_tok,
        "dispatch_weights_max_mean": (dispatch.amax(2) * sr).sum() / sr.sum().clamp_min(1),
    }
