"""Buffer reuse (`BufferPool`): the fused layers hand last step's buffers back only when
nothing references them, so results never change and nothing a caller holds is overwritten."""
import copy
import io
import threading

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from softmoe import SoftMoE, TokensChoiceMoE, release_buffers
from softmoe.layers.fused.buffers import BufferPool, pool_of, pooled_bytes, set_buffer_reuse

D, E, P, H = 8, 4, 2, 16


def make(dtype=torch.float64, pool=True, seed=0, impl="fused"):
    torch.manual_seed(seed)
    layer = SoftMoE(D, E, slots_per_expert=P, hidden_dim=H, expert_init="distinct", impl=impl).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    set_buffer_reuse(layer, pool)
    return layer


def data(seed, B=3, N=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g, dtype=dtype), torch.randn(B, N, D, generator=g, dtype=dtype))


def step(layer, x, dy):
    """One training step as a loop does it: zero_grad(set_to_none=True), forward, backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y, x.grad, {n: p.grad for n, p in layer.named_parameters()}


def test_weight_grads_reuse_last_steps_buffers_with_identical_results():
    pooled, fresh = make(torch.float32), make(torch.float32, pool=False)
    ptrs = []
    for seed in range(3):
        x, dy = data(seed, dtype=torch.float32)
        y1, gx1, g1 = step(pooled, x, dy)
        y2, gx2, g2 = step(fresh, x, dy)
        assert torch.equal(y1, y2) and torch.equal(gx1, gx2)
        for n in g1:
            assert torch.equal(g1[n], g2[n]), n  # the same arithmetic, bit for bit
        ptrs.append((g1["experts.w1"].data_ptr(), g1["experts.w2"].data_ptr()))
        del y1, gx1, g1
    assert ptrs[0] == ptrs[1] == ptrs[2]  # no new weight-gradient buffers after the first step


def test_grads_kept_by_the_caller_are_never_overwritten():
    layer = make()
    _, _, g = step(layer, *data(0))
    kept = {n: t for n, t in g.items()}
    saved = {n: t.clone() for n, t in g.items()}
    _, _, g_next = step(layer, *data(1))  # zero_grad dropped .grad, but we still hold the tensors
    for n in kept:
        assert torch.equal(kept[n], saved[n]), n
        assert kept[n].data_ptr() != g_next[n].data_ptr(), n


def test_outputs_and_input_grads_kept_by_the_caller_survive_later_steps():
    layer = make()
    y0, gx0, _ = step(layer, *data(0))
    y0c, gx0c = y0.detach().clone(), gx0.clone()
    with torch.no_grad():
        layer(data(2)[0])  # an inference forward in between
    step(layer, *data(1))
    assert torch.equal(y0, y0c) and torch.equal(gx0, gx0c)


@pytest.mark.parametrize("case", ["accumulate", "two_forwards", "retain_graph", "checkpoint"])
def test_unusual_graphs_match_plain_autograd(case):
    """Orders in which buffers are still in use when asked for again: each must give plain
    autograd's gradients (float64, 1e-12)."""
    results = []
    for impl in ("fused", "reference"):
        layer = make(impl=impl)
        (x1, d1), (x2, d2) = data(0), data(1)
        x1, x2 = x1.requires_grad_(), x2.requires_grad_()
        if case == "accumulate":  # two steps, grads summed (zero_grad(set_to_none=False) style)
            layer(x1).backward(d1)
            layer(x2).backward(d2)
        elif case == "two_forwards":  # the same layer twice in one graph
            ((layer(x1) * d1).sum() + (layer(x2) * d2).sum()).backward()
        elif case == "retain_graph":
            y = layer(x1)
            y.backward(d1, retain_graph=True)
            y.backward(d2)
        else:  # activation checkpointing re-runs the forward inside the backward
            checkpoint(layer, x1, use_reentrant=False).backward(d1)
            checkpoint(layer, x2, use_reentrant=False).backward(d2)
        grads = [x1.grad, x2.grad] + [p.grad for p in layer.parameters()]
        results.append([g for g in grads if g is not None])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_concurrent_backward_from_two_threads():
    layer = make()
    inputs = [data(s) for s in range(2)]
    want = []
    for x, dy in inputs:
        xg = x.clone().requires_grad_()
        want.append(torch.autograd.grad(layer(xg), xg, dy)[0])
    errors = []

    def worker(i):
        x, dy = inputs[i]
        for _ in range(30):
            xg = x.clone().requires_grad_()
            got = torch.autograd.grad(layer(xg), xg, dy)[0]
            if not torch.equal(got, want[i]):
                errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_retained_roles_and_release():
    layer = make(torch.float32)
    step(layer, *data(0, dtype=torch.float32))
    layer.zero_grad(set_to_none=True)
    # What a layer keeps between steps (each role is justified in softmoe/layers/fused/buffers.py);
    # a new role must be added here deliberately. Each component owns its pool: the router its
    # routing buffers, the experts theirs; the layer itself keeps nothing.
    assert set(pool_of(layer.router)._storages) == {"slots", "y", "g_ys", "dx"}
    assert set(pool_of(layer.experts)._storages) == {"w1_grad", "w2_grad", "h", "a"}
    assert pool_of(layer)._storages == {}
    grads = 2 * E * D * H * 4
    held = pooled_bytes(layer)
    assert held >= grads
    assert release_buffers(layer) == held and pooled_bytes(layer) == 0
    _, _, g = step(layer, *data(1, dtype=torch.float32))  # and it simply starts again
    assert g["experts.w1"] is not None and pooled_bytes(layer) > 0


def test_disabled_pool_keeps_nothing():
    layer = make(torch.float32, pool=False)
    step(layer, *data(0, dtype=torch.float32))
    assert pool_of(layer)._storages == {} and pooled_bytes(layer) == 0


def test_sparse_layers_experts_use_their_own_pool():
    layer = TokensChoiceMoE(D, E, hidden_dim=H)
    layer(torch.randn(2, 5, D)).sum().backward()
    layer.zero_grad(set_to_none=True)
    assert set(pool_of(layer.experts)._storages) == {"w1_grad", "w2_grad", "h", "a"}
    assert pool_of(layer)._storages == {}  # the routing keeps nothing
    assert release_buffers(layer) > 0 and pooled_bytes(layer) == 0


def test_copies_get_their_own_empty_pool():
    layer = make()
    step(layer, *data(0))
    twin = copy.deepcopy(layer)
    assert pool_of(twin) is not pool_of(layer) and pool_of(twin)._storages == {}
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes, written just above
    assert pool_of(loaded)._storages == {}
    x, dy = data(1)
    for a, b in zip(step(twin, x, dy)[2].values(), step(layer, x, dy)[2].values()):
        assert torch.equal(a, b)


def test_pool_hands_out_free_buffers_only():
    pool = BufferPool()
    like = torch.empty(0)
    a = pool.empty("r", (4, 5), like)
    ptr = a.data_ptr()
    assert pool.scratch("r", (2, 3), like) is None  # in use
    b = pool.empty("r", (4, 5), like)  # in use: a new buffer becomes the role's
    assert b.data_ptr() != ptr
    del b
    c = pool.empty("r", (20,), like)  # free again: handed back, in any shape of the same size
    assert c.shape == (20,) and pool.nbytes() == 0
    c_ptr = c.data_ptr()
    del c
    s = pool.scratch("r", (2, 3), like)  # a view of the start of the free buffer
    assert s.shape == (2, 3) and s.data_ptr() == c_ptr
    assert pool.scratch("r", (30,), like) is None  # too large
    assert pool.empty("r", (20,), like).data_ptr() != c_ptr  # s still lives: the buffer is in use
    a.fill_(1.0)
    assert pool.nbytes() == 4 * 5 * 4
    assert pool.empty("other", (3,), torch.empty(0, dtype=torch.float64)).dtype == torch.float64


def test_inference_keeps_nothing():
    layer = make(torch.float32)
    x, _ = data(0, dtype=torch.float32)
    with torch.no_grad():
        layer(x)
    layer.requires_grad_(False)
    layer(x)  # grad mode on, but nothing to differentiate: no training step either
    assert pool_of(layer)._storages == {}


def test_set_buffer_reuse_switches_every_pool_of_a_model():
    model = torch.nn.Sequential(make(torch.float32, seed=0), make(torch.float32, seed=1))
    with pytest.raises(ValueError, match="enabled must be a bool"):
        set_buffer_reuse(model, "no")
    fresh = torch.nn.Sequential(make(torch.float32, seed=0))
    set_buffer_reuse(fresh, False)  # before any step: holds for the pools made later
    x, dy = data(0, dtype=torch.float32)
    fresh(x).backward(dy)
    fresh.zero_grad(set_to_none=True)
    assert pooled_bytes(fresh) == 0
    model(x.requires_grad_()).backward(dy)
    model.zero_grad(set_to_none=True)
    assert pooled_bytes(model) > 0
    set_buffer_reuse(model, False)
    assert pooled_bytes(model) == 0
    model(x).backward(dy)
    model.zero_grad(set_to_none=True)
    assert pooled_bytes(model) == 0
    set_buffer_reuse(model, True)
    model(x).backward(dy)
    model.zero_grad(set_to_none=True)
    assert pooled_bytes(model) > 0


def test_reused_buffers_stay_on_the_tensors_device_whatever_the_default_device():
    pool = BufferPool()
    like = torch.empty(0, device="cpu")
    del_me = pool.empty("r", (3,), like)
    del del_me
    torch.set_default_device("meta")
    try:
        again = pool.empty("r", (3,), like)
        view = pool.scratch("s", (1,), like)
    finally:
        torch.set_default_device(None)
    assert again.device.type == "cpu" and view is None
