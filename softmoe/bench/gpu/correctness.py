"""(a) SoftMoE's fused and reference paths against float64, forward and gradients, per dtype."""
from __future__ import annotations

import contextlib

import torch

from softmoe import SoftMoE

# Tolerances on max|a - ref| / max|ref| (forward output, and each gradient): fp32 accumulates
# ~1e-6 relative per op over a few hundred terms; bf16 has 8 mantissa bits (2^-8 = 3.9e-3 per
# rounding, a few roundings deep); fp16 has 11 (4.9e-4). Routing stays float32 in all of them.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _set_impl(module: torch.nn.Module, impl: str) -> None:
    for m in module.modules():
        if hasattr(m, "impl"):
            m.impl = impl


def _run(layer: SoftMoE, x: torch.Tensor, dy: torch.Tensor, dtype: str) -> tuple[torch.Tensor, dict]:
    """Output (float64) and the gradients of x and every parameter (float64) of one fwd + bwd."""
    for p in layer.parameters():
        p.grad = None
    xg = x.detach().requires_grad_()
    ac = AUTOCAST[dtype]
    with torch.autocast(x.device.type, dtype=ac) if ac is not None else contextlib.nullcontext():
        y = layer(xg)
    y.backward(dy.to(y.dtype))
    grads = {"x": xg.grad.double(), **{n: p.grad.double() for n, p in layer.named_parameters()}}
    return y.detach().double(), grads


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def check(device: torch.device, dtypes: list[str], dim: int = 64, experts: int = 8, hidden: int = 128, batch: int = 4,
          tokens: int = 49, seed: int = 0) -> list[dict]:
    """One row per (dtype, impl): the worst relative error of the output and of the gradients
    against the float64 reference path (same weights and inputs), and whether it is within
    TOLERANCE[dtype]."""
    torch.manual_seed(seed)
    base = SoftMoE(dim, experts, 1, hidden)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, tokens, dim, generator=g)
    dy = torch.randn(batch, tokens, dim, generator=g)
    ref_layer = SoftMoE(dim, experts, 1, hidden).double().to(device)
    ref_layer.load_state_dict(base.state_dict())
    _set_impl(ref_layer, "reference")
    y64, g64 = _run(ref_layer, x.double().to(device), dy.double().to(device), "fp32")
    rows = []
    for dtype in dtypes:
        for impl in ("fused", "reference"):
            layer = SoftMoE(dim, experts, 1, hidden).to(device)
            layer.load_state_dict(base.state_dict())
            _set_impl(layer, impl)
            y, grads = _run(layer, x.to(device), dy.to(device), dtype)
            fwd = _rel(y, y64)
            worst_name, worst = max(((n, _rel(grads[n], g64[n])) for n in g64), key=lambda t: t[1])
            rows.append({"dtype": dtype, "impl": impl, "fwd_rel_err": fwd, "grad_rel_err": worst,
                         "worst_grad": worst_name, "tolerance": TOLERANCE[dtype],
                         "ok": fwd <= TOLERANCE[dtype] and worst <= TOLERANCE[dtype]})
    return rows
