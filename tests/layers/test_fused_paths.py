"""The fast paths (impl="fused": `FusedSoftRouting`, `ExpertsMLP`, hand-written backwards)
compute the same function and gradients as plain autograd (impl="reference"), in float64 at
1e-12.

Device-agnostic (tests/conftest.py): layers and inputs on the `device` under test, both impls
compared there at the same float64 tolerance; the CPU buffer pool's tests (the pool is
CPU-only by design, docs/design.md §7.2) are `cpu_only`."""
import math

import pytest
import torch

import softmoe.layers.fused.buffers as experts_mod
import softmoe.layers.fused.experts as experts_layer
from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.layers.experts import Experts
from softmoe.layers.fused.buffers import fresh_buffer


def randomized(layer, seed=0):
    """Random parameters, drawn on the CPU (the same on every device) and copied to theirs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def tokens(device, B, N, D, seed=1):
    """float64 tokens (B, N, D) on `device`, drawn there, with norms from 0.1 to 10."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64, device=device)
    scale = torch.empty(B, N, 1, dtype=torch.float64, device=device).uniform_(math.log(0.1), math.log(10), generator=g)
    return x * torch.exp(scale)


def reference_twin(make, layer):
    """`make(impl="reference")` with `layer`'s weights, dtype and mode."""
    twin = make(impl="reference").to(next(layer.parameters()).dtype).train(layer.training)
    twin.load_state_dict(layer.state_dict())
    return twin


def run(layer, x, mask, dy):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(5)  # same noise draw in both runs (seeds the CUDA generators too)
    y = layer(x, mask)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]


def assert_close64(got, want):
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * max(want.abs().max().item(), 1e-300))


def grad_fn_names(t):
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("masking", ["none", "partial", "one_sequence_all_masked"])
@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_soft_moe_fused_equals_autograd_float64(P, normalize, masking, noise, device, generator):
    def make(impl="fused"):
        return SoftMoE(6, 4, slots_per_expert=P, hidden_dim=5, normalize=normalize, noise_std=noise,
                       impl=impl).to(device)

    layer = randomized(make().double())
    with torch.no_grad():
        layer.router.scale.fill_(2.5)
    layer.train(noise > 0)
    x = tokens(device, 3, 7, 6)
    mask = None
    if masking != "none":
        mask = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool,
                            device=device)
        if masking == "one_sequence_all_masked":
            mask[1] = False
    dy = torch.randn(3, 7, 6, dtype=torch.float64, generator=generator, device=device)
    fused = run(layer, x, mask, dy)
    assert "FusedSoftRoutingBackward" in grad_fn_names(layer(x.clone().requires_grad_(), mask))
    twin = reference_twin(make, layer)
    plain = run(twin, x, mask, dy)
    names = grad_fn_names(twin(x.clone().requires_grad_(), mask))
    assert not names & {"FusedSoftRoutingBackward", "ExpertsMLPBackward"}
    for got, want in zip(fused, plain):
        assert torch.isfinite(got).all()
        assert_close64(got, want)


FUSED_NODES = {"FusedSoftRoutingBackward", "FusedCombineBackward", "ExpertsMLPBackward"}


def test_plain_autograd_path_where_fusion_does_not_apply(device):
    x = tokens(device, 2, 6, 6).float().requires_grad_()
    layer = SoftMoE(6, 3, slots_per_expert=2, hidden_dim=5).to(device)
    assert grad_fn_names(layer(x)) >= FUSED_NODES
    with torch.autocast(device.type, dtype=torch.bfloat16):  # the fused path too (test_mixed_precision.py)
        assert grad_fn_names(layer(x)) >= FUSED_NODES
        assert not grad_fn_names(layer.double()(x.double())) & FUSED_NODES  # float64 is not autocast's
    ablation = SoftMoE(6, 3, slots_per_expert=2, hidden_dim=5, dispatch="uniform").to(device)
    names = grad_fn_names(ablation(x))
    assert "ExpertsMLPBackward" in names and not names & {"FusedSoftRoutingBackward", "FusedCombineBackward"}
    assert not grad_fn_names(SoftMoE(6, 3, hidden_dim=5, impl="reference").to(device)(x)) & FUSED_NODES
    for sparse in (TokensChoiceMoE(6, 3, hidden_dim=5).to(device), ExpertsChoiceMoE(6, 3, hidden_dim=5).to(device)):
        assert "ExpertsMLPBackward" in grad_fn_names(sparse(x))
    for sparse in (TokensChoiceMoE(6, 3, hidden_dim=5, impl="reference").to(device),
                   ExpertsChoiceMoE(6, 3, hidden_dim=5, impl="reference").to(device)):
        assert sparse.experts.impl == "reference" and "ExpertsMLPBackward" not in grad_fn_names(sparse(x))


def test_impl_is_validated_and_shown():
    for cls in (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE):
        with pytest.raises(ValueError, match=r"impl must be one of \['fused', 'reference'\], got 'fast'"):
            cls(6, 3, impl="fast")
        layer = cls(6, 3, impl="reference")
        assert "impl='reference'" in repr(layer) and "impl='reference'" in repr(layer.experts)
    with pytest.raises(ValueError, match="impl must be one of"):
        Experts(3, 4, 6, impl=None)
    assert "impl='fused'" in repr(SoftMoE(6, 3))


@pytest.mark.parametrize("frozen", [(), ("x",), ("w1", "b1"), ("w2", "b2", "x")])
def test_experts_fused_equals_autograd_float64(frozen, device, generator):
    ex = randomized(Experts(3, 4, 6, expert_init="distinct").double().to(device))
    x = 3 * torch.randn(3, 5, 4, dtype=torch.float64, generator=generator, device=device)  # all of the GELU curve
    dy = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator, device=device)
    results = []
    twin = reference_twin(lambda impl: Experts(3, 4, 6, expert_init="distinct", impl=impl).to(device), ex)
    for module in (ex, twin):
        module.zero_grad(set_to_none=True)
        for name, p in module.named_parameters():
            p.requires_grad_(name not in frozen)
        xi = x.clone().requires_grad_("x" not in frozen)
        y = module(xi)
        y.backward(dy)
        results.append([y.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        if want is None:
            assert got is None
        else:
            assert_close64(got, want)


def test_double_backward_needs_the_reference_impl(device):
    layer = randomized(SoftMoE(4, 2, hidden_dim=3).double().to(device))
    x = tokens(device, 1, 3, 4).requires_grad_()
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    layer = reference_twin(lambda impl: SoftMoE(4, 2, hidden_dim=3, impl=impl).to(device), layer)
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    g.sum().backward()  # plain autograd: second order works
    assert torch.isfinite(x.grad).all()


@pytest.mark.cpu_only  # madvise of CPU memory: fresh_buffer advises CPU tensors only
def test_fresh_buffer_advises_the_aligned_interior(monkeypatch):
    calls = []
    monkeypatch.setattr(experts_mod, "_madvise",
                        lambda: lambda start, length, advice: calls.append((start, length, advice)))
    like = torch.empty(0)
    small = fresh_buffer((7, 1 << 20), like)  # 28 MiB
    assert small.shape == (7, 1 << 20) and not calls  # under 32 MiB: left to glibc's heap
    big = fresh_buffer((9, 1 << 20), like)  # 36 MiB
    assert big.shape == (9, 1 << 20) and big.dtype == like.dtype
    ((start, length, advice),) = calls
    huge = 2 << 20
    assert advice == 14 and start % huge == 0 and length % huge == 0  # MADV_HUGEPAGE, whole huge pages
    assert big.data_ptr() <= start and start + length <= big.data_ptr() + big.nbytes
    assert length >= big.nbytes - 2 * huge


@pytest.mark.cpu_only  # the buffer pool serves CPU tensors only (device allocators cache memory themselves)
def test_weight_grads_are_the_fresh_buffers(monkeypatch):
    made = []
    real = experts_mod.fresh_buffer

    def recording(shape, like):
        out = real(shape, like)
        made.append(out.data_ptr())
        return out

    monkeypatch.setattr(experts_mod, "fresh_buffer", recording)
    ex = Experts(4, 8, 16)
    ex(torch.randn(4, 3, 8)).sum().backward()
    # autograd adopted the pool's first buffers as .grad (no copy into yet another buffer)
    assert {ex.w1.grad.data_ptr(), ex.w2.grad.data_ptr()} <= set(made)


def test_experts_retain_graph_second_backward_works(device, generator):
    # The fused backward writes dL/dh over the saved h only when the graph is not retained;
    # a second backward through a retained graph reads the intact h: the same gradients.
    ex = randomized(Experts(3, 4, 6, expert_init="distinct").double().to(device))
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator, device=device, requires_grad=True)
    y = ex(x)
    dy = torch.randn_like(y)
    y.backward(dy, retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in ex.parameters()]
    y.backward(dy)
    for got, one in zip([x.grad] + [p.grad for p in ex.parameters()], first):
        assert_close64(got, 2 * one)


@pytest.mark.parametrize("group_bytes", [None, 1, 2 * 5 * 6 * 8])  # all at once; one expert; 2 (last group 1)
def test_experts_inference_forward_equals_training_forward(group_bytes, monkeypatch, device, generator):
    # Without a graph the GELU runs in place, a group of experts at a time: the same numbers (bit
    # for bit in one group; in several, BLAS may round a batch of different size differently).
    if group_bytes is not None:
        monkeypatch.setattr(experts_layer, "INFERENCE_HIDDEN_BYTES", group_bytes)
    ex = randomized(Experts(3, 4, 6, expert_init="distinct").double().to(device))
    x = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator, device=device)
    with torch.no_grad():
        y0 = ex(x)
    if group_bytes is None:
        assert torch.equal(y0, ex(x).detach())
    else:
        assert_close64(y0, ex(x).detach())


def test_hugepage_advice_is_opt_in(monkeypatch):
    for value in (None, "0", "yes"):  # only "1" turns the advice on
        if value is None:
            monkeypatch.delenv("SOFTMOE_HUGEPAGES", raising=False)
        else:
            monkeypatch.setenv("SOFTMOE_HUGEPAGES", value)
        experts_mod._madvise.cache_clear()
        try:
            assert experts_mod._madvise() is None
        finally:
            experts_mod._madvise.cache_clear()
    monkeypatch.setenv("SOFTMOE_HUGEPAGES", "1")
    try:
        thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        thp = "[never]"
    try:
        assert (experts_mod._madvise() is not None) == ("[never]" not in thp)
    finally:
        experts_mod._madvise.cache_clear()


@pytest.mark.parametrize("cls,kwargs", [(TokensChoiceMoE, dict(k=2, capacity_factor=1.0, group_size=3)),
                                        (ExpertsChoiceMoE, dict(capacity_factor=2.0))])
def test_sparse_layers_fused_equal_reference_float64(cls, kwargs, device, generator):
    def make(impl="fused"):
        return cls(6, 4, hidden_dim=5, noise_std=0.7, impl=impl, **kwargs).to(device)

    layer = randomized(make().double()).train()
    x, dy = tokens(device, 3, 7, 6), torch.randn(3, 7, 6, dtype=torch.float64, generator=generator, device=device)
    mask = torch.rand(3, 7, generator=generator, device=device) > 0.3
    fused = run(layer, x, mask, dy)
    plain = run(reference_twin(make, layer), x, mask, dy)
    for got, want in zip(fused, plain):
        if want is None:
            assert got is None
        else:
            assert_close64(got, want)
