"""The benchmark's layer shape and the nominal FLOPs of one Soft MoE layer at it."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int
    dim: int
    experts: int
    slots: int
    hidden: int

    def label(self) -> str:
        return f"B={self.batch} N={self.tokens} D={self.dim} E={self.experts} P={self.slots} H={self.hidden}"


def layer_flops(s: Shape) -> int:
    """Nominal forward FLOPs of one Soft MoE layer (a multiply-add = 2; matmuls/einsums only):
    routing logits 2BNDS + dispatch 2BNSD + experts 2*2BSDH + combine 2BNSD, S = E*P.
    Forward+backward counts 3x this (each matmul has two backward matmuls of its size)."""
    S = s.experts * s.slots
    return 2 * s.batch * s.tokens * s.dim * S * 3 + 4 * s.batch * S * s.dim * s.hidden
