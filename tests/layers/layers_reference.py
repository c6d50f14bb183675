"""Float64 references for the layer tests, written from the formulas in docs/design.md §1-2 and
deliberately independent of softmoe's helpers (no router/experts/softmax code reused):
explicit exp/sum softmaxes, an explicit tanh-GELU, Python loops over sequences/tokens.
They compute on the device of their inputs (float64 exists on CUDA too), so the
device-agnostic tests (SOFTMOE_TEST_DEVICE, tests/conftest.py) compare on the device.

The module name is unique on purpose: the tests directory has no __init__.py files, so
pytest puts tests/layers on sys.path and a generic name could collide with another folder.
"""
from __future__ import annotations

import math

import torch

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (Flax's default), written out."""
    return 0.5 * h * (1.0 + torch.tanh(SQRT_2_OVER_PI * (h + 0.044715 * h**3)))


def gelu_exact(h: torch.Tensor) -> torch.Tensor:
    """Exact GELU (timm's default), written out: h * Phi(h)."""
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def expert_mlp(v: torch.Tensor, params: dict, e: int, act=gelu_tanh) -> torch.Tensor:
    """Expert e applied to v (..., D): W2_e act(W1_e v + b1_e) + b2_e (act: tanh GELU)."""
    h = v @ params["w1"][e] + params["b1"][e]
    return act(h) @ params["w2"][e] + params["b2"][e]


def expert_params(experts) -> dict:
    return {k: getattr(experts, k).detach().double() for k in ("w1", "b1", "w2", "b2")}


def softmax_explicit(z: torch.Tensor, dim) -> torch.Tensor:
    z = z - z.amax(dim=dim, keepdim=True)
    ez = torch.exp(z)
    return ez / ez.sum(dim=dim, keepdim=True)


def soft_moe_reference(layer, x: torch.Tensor, mask: torch.Tensor | None = None,
                       dispatch_normalized: bool = False, act=gelu_tanh) -> torch.Tensor:
    """Algorithm 1 of the paper with vmoe's l2 normalisation, one sequence at a time.

    Masked tokens are simply removed from their sequence (the semantics the layer promises)
    and get a zero output. `dispatch_normalized=True` builds the slots from the normalised
    tokens (the bug of the popular ports), to show the tests can tell the difference.
    `act`: the experts' activation (the tanh GELU of the paper by default).
    """
    x = x.detach().double()
    phi = layer.router.phi.detach().double()  # (D, E, P)
    scale = float(layer.router.scale.detach())
    params = expert_params(layer.experts)
    B, N, D = x.shape
    _, E, P = phi.shape
    out = torch.zeros(B, N, D, dtype=torch.float64, device=x.device)  # on x's device (CUDA has float64)
    for b in range(B):
        real = torch.ones(N, dtype=torch.bool, device=x.device) if mask is None else mask[b]
        if not real.any():
            continue
        xr = x[b][real]  # (n, D) real tokens only
        if layer.router.normalize:
            xn = xr / torch.sqrt((xr**2).sum(-1, keepdim=True) + 1e-6)
            phin = phi / torch.sqrt((phi**2).sum(0, keepdim=True) + 1e-6)
        else:
            xn, phin = xr, phi
        logits = scale * torch.einsum("nd,dep->nep", xn, phin)  # (n, E, P)
        dw = softmax_explicit(logits, dim=0)  # over tokens, per slot
        cw = softmax_explicit(logits.reshape(-1, E * P), dim=1).reshape(-1, E, P)  # over all slots, per token
        slots = torch.einsum("nep,nd->epd", dw, xn if dispatch_normalized else xr)  # (E, P, D)
        ys = torch.stack([expert_mlp(slots[e], params, e, act) for e in range(E)])  # (E, P, D)
        out[b, real] = torch.einsum("nep,epd->nd", cw, ys)
    return out


def randomize_(module: torch.nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Replace every parameter by N(0, std^2) values (distinct experts, non-zero biases,
    non-trivial routing), so a mixed-up expert, slot or axis shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> None:
    """float64 comparison: rtol relative to the largest expected magnitude (a handful of
    reductions of O(100) terms lose ~1e-14 relative; 1e-12 leaves margin, while any rule
    error is O(1e-3) or larger)."""
    assert actual.dtype == torch.float64 and expected.dtype == torch.float64
    atol = rtol * max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
