"""The compiled passes of the routing backward (`softmoe.kernels.routing_dx_dw`,
`combine_backward`) against float64 torch, and a whole SoftMoE training step with them on and off.

Tolerance: float32 sums over at most S=8 terms (dx) or B*N <= 250 terms (dw) in another order
than torch's: a few ulp of the output's largest magnitude; compared at 2e-6 of it (observed
below 1e-6; a wrong stride, mask or slot chunk gives errors of order 1).
"""
import pytest
import torch

import softmoe.kernels as K
from softmoe import SoftMoE

RTOL = 2e-6

K._library()
needs_kernels = pytest.mark.skipif(K._library() is None and not K._state["failed"], reason=f"kernels {K.status()}")


@pytest.fixture
def on(monkeypatch):
    monkeypatch.setitem(K._state, "enabled", True)


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def operands(B, N, D, S, seed=0):
    """x, dispatch, g, g_xs as the slot-major (S, B, D) buffer's strided (B, S, D) view, w, c."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=gen)
    dispatch, g = torch.rand(B, N, S, generator=gen), torch.randn(B, N, S, generator=gen)
    g_xs = torch.randn(S, B, D, generator=gen).transpose(0, 1)
    return x, dispatch, g, g_xs, torch.randn(D, S, generator=gen), torch.randn(B, N, 1, generator=gen)


def reference(x, dispatch, g, g_xs, w, c):
    x, dispatch, g, g_xs, w = (t.double() for t in (x, dispatch, g, g_xs, w))
    dx = torch.bmm(dispatch, g_xs) + g @ w.t()
    if c is not None:
        dx = dx - c.double() * x
    return dx, x.reshape(-1, x.shape[2]).t() @ g.reshape(-1, g.shape[2])


# every path: D a multiple of 32, of 16 only, with a tail vector, one column; S = 1..8 (a
# partial slot chunk); one sequence; more threads than sequences
SHAPES = [(2, 11, 64, 8), (3, 5, 48, 3), (4, 7, 70, 5), (1, 1, 1, 1), (5, 13, 17, 8), (2, 3, 33, 7)]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_c", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_float64(on, shape, with_c, threads):
    x, dispatch, g, g_xs, w, c = operands(*shape)
    c = c if with_c else None
    assert K.use_routing_kernel(shape[3], x, g_xs, w, dispatch, g, c)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full_like(x, float("nan"))
        dx, dw = K.routing_dx_dw(x, dispatch, g, g_xs, w, c, out=out)
    finally:
        torch.set_num_threads(old)
    want_dx, want_dw = reference(x, dispatch, g, g_xs, w, c)
    assert dx is out and dw.shape == w.shape
    assert rel_err(dx, want_dx) < RTOL and rel_err(dw, want_dw) < RTOL


def test_torch_path_beyond_the_slot_limit_and_for_float64(on):
    """More than MAX_ROUTING_SLOTS slots, or float64: torch ops, the same function."""
    for S, dtype in ((K.MAX_ROUTING_SLOTS + 1, torch.float32), (4, torch.float64)):
        x, dispatch, g, g_xs, w, c = (t.to(dtype) for t in operands(3, 6, 40, S))
        assert not K.use_routing_kernel(S, x, g_xs, w, dispatch, g, c)
        dx, dw = K.routing_dx_dw(x, dispatch, g, g_xs, w, c)
        want_dx, want_dw = reference(x, dispatch, g, g_xs, w, c)
        tol = 1e-12 if dtype == torch.float64 else RTOL
        assert rel_err(dx, want_dx) < tol and rel_err(dw, want_dw) < tol


def test_switched_off_it_is_the_torch_path(monkeypatch):
    monkeypatch.setitem(K._state, "enabled", False)
    x, dispatch, g, g_xs, w, c = operands(2, 5, 32, 4)
    assert not K.use_routing_kernel(4, x, g_xs, w, dispatch, g, c)


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("want", ["both", "g_ys", "g_combine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_combine_backward_matches_float64(on, shape, want, threads):
    """dL/dys into a slot-major buffer's strided view, dL/dcombine, or both."""
    gy, combine, _, ys, _, _ = operands(*shape, seed=1)
    B, N, D, S = shape
    buf = torch.full((S, B, D), float("nan"))
    g_ys = buf.transpose(0, 1) if want != "g_combine" else None
    assert K.use_routing_kernel(S, gy, ys, g_ys, combine)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g_combine = K.combine_backward(gy, combine, ys, g_ys, want_combine=want != "g_ys")
    finally:
        torch.set_num_threads(old)
    if want != "g_combine":
        assert rel_err(g_ys, combine.double().transpose(1, 2) @ gy.double()) < RTOL
    else:
        assert buf.isnan().all()  # not asked for: untouched
    if want != "g_ys":
        assert rel_err(g_combine, gy.double() @ ys.double().transpose(1, 2)) < RTOL
    else:
        assert g_combine is None


def test_combine_backward_torch_path(on):
    gy, combine, _, ys, _, _ = operands(3, 6, 40, K.MAX_ROUTING_SLOTS + 1)
    g_ys = torch.empty(3, K.MAX_ROUTING_SLOTS + 1, 40)
    assert not K.use_routing_kernel(K.MAX_ROUTING_SLOTS + 1, gy, ys, g_ys, combine)
    g_combine = K.combine_backward(gy, combine, ys, g_ys, want_combine=True)
    assert rel_err(g_ys, combine.double().transpose(1, 2) @ gy.double()) < RTOL
    assert rel_err(g_combine, gy.double() @ ys.double().transpose(1, 2)) < RTOL


@needs_kernels
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask", [False, True])
def test_soft_moe_step_with_and_without_the_kernel(on, monkeypatch, normalize, mask):
    """A SoftMoE training step with S = 8 slots: outputs and every gradient agree with the
    torch path (the experts' kernels off in both runs, so that only these two differ)."""
    monkeypatch.setattr(K, "MIN_WEIGHT_BYTES", 1 << 62)  # the expert matmuls on torch ops
    torch.manual_seed(0)
    layer = SoftMoE(40, 4, slots_per_expert=2, hidden_dim=64, normalize=normalize)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x0, dy = torch.randn(6, 9, 40), torch.randn(6, 9, 40)
    m = torch.rand(6, 9) > 0.3 if mask else None
    results, used = [], []
    calls = []

    class Counting:  # records calls of the two compiled functions, then runs them
        def __getattr__(self, name):
            lib = K._state["lib"]
            if name in ("routing_dx_dw", "combine_backward"):
                fn = getattr(lib, name)
                return lambda *a: (calls.append(name), fn(*a))[1]
            return getattr(lib, name)

    monkeypatch.setattr(K, "_library", lambda: Counting())
    for enabled in (True, False):
        calls.clear()
        with K.use_kernels(enabled):
            for _ in range(2):  # the second step reuses the pooled buffers
                layer.zero_grad(set_to_none=True)
                x = x0.clone().requires_grad_()
                layer(x, m).backward(dy)
        used.append(sorted(set(calls)))
        results.append([x.grad] + [p.grad.clone() for p in layer.parameters()])
    assert used == [["combine_backward", "routing_dx_dw"], []]
    for got, want in zip(*results):
        assert rel_err(got, want.double()) < 1e-5  # float32 routing and experts on top: a few ulp more
