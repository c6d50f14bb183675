"""The benchmark's layer shape and the nominal FLOPs of one Soft MoE layer at it."""
from __future__ import annotations

import dataclasses


DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}  # --dtype -> the autocast dtype (None: off)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The layer's shape, and where and how it runs (the worker processes get all of it)."""
    batch: int
    tokens: int
    dim: int
    experts: int
    slots: int
    hidden: int
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "fp32"  # one of DTYPES: fp32 weights always; bf16/fp16 run under torch.autocast
    compile: bool = False  # torch.compile the layer (the fused path steps aside for the compiled graph)

    def label(self) -> str:
        extra = "" if (self.device, self.dtype, self.compile) == ("cpu", "fp32", False) else (
            f" {self.device} {self.dtype}" + (" compiled" if self.compile else ""))
        return f"B={self.batch} N={self.tokens} D={self.dim} E={self.experts} P={self.slots} H={self.hidden}" + extra


def layer_flops(s: Shape) -> int:
    """Nominal forward FLOPs of one Soft MoE layer (a multiply-add = 2; matmuls/einsums only):
    routing logits 2BNDS + dispatch 2BNSD + experts 2*2BSDH + combine 2BNSD, S = E*P.
    Forward+backward counts 3x this (each matmul has two backward matmuls of its size)."""
    S = s.experts * s.slots
    return 2 * s.batch * s.tokens * s.dim * S * 3 + 4 * s.batch * S * s.dim * s.hidden


ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def layer_bytes(s: Shape) -> int:
    """Nominal forward bytes of one Soft MoE layer at the dtype's element size (each tensor
    read or written once; under autocast the fp32 weights are read once and cast): tokens in
    and out 2BND, weights 2EDH (+ their casts), routing logits and the two softmaxes 3BNS,
    slot inputs/outputs 2BSD, hidden 2BSH. Forward+backward counts 3x this."""
    e = ELEMENT_BYTES[s.dtype]
    S = s.experts * s.slots
    weights = 2 * s.experts * s.dim * s.hidden * (4 + (e if s.dtype != "fp32" else 0))
    return weights + e * (2 * s.batch * s.tokens * s.dim + 3 * s.batch * s.tokens * S + 2 * s.batch * S * s.dim
                          + 2 * s.batch * S * s.hidden)
