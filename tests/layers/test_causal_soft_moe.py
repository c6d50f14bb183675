"""CausalSoftMoE (docs/design.md §8): a float64 per-position reference, exact causality,
bit-identical past outputs, cost S per chunk, linear routing cost, per-sequence independence,
rotating anchors, decoding = parallel forward with bounded state, mask, autocast, impls,
metrics, torch.compile, and argument errors.

Device-agnostic (tests/conftest.py): layers, inputs, masks and the float64 reference on the
`device` under test (weights drawn on the CPU, the same everywhere; inputs drawn on the
device), with the same tolerances: float64 at 1e-12, float32 comparisons kept in float32 (TF32
is off by default for CUDA matmuls)."""
import pytest
import torch
from layers_reference import expert_mlp, expert_params, randomize_, softmax_explicit
from torch.utils.flop_counter import FlopCounterMode

from softmoe import CausalSoftMoE, SoftMoE, collect_metrics, record_routing

CONFIGS = [  # (T, C, E, P): T below, equal to, above and not a multiple of C; S = C and S < C
    (5, 4, 2, 2), (13, 6, 4, 1), (12, 4, 2, 2), (17, 8, 3, 2), (9, 3, 3, 1),
]


def make(device, C, E, P, rotate=True, impl="reference", dtype=torch.float64, seed=0, D=6):
    layer = CausalSoftMoE(D, E, slots_per_expert=P, chunk_size=C, hidden_dim=8, rotate=rotate, impl=impl)
    randomize_(layer, std=0.5, seed=seed)
    return layer.to(dtype).to(device)


def randn(device, *shape, seed=0, dtype=torch.float32):
    """Standard normal (shape) on `device`, drawn there from a generator seeded `seed`."""
    return torch.randn(shape, generator=torch.Generator(device=device).manual_seed(seed), dtype=dtype, device=device)


def causal_reference(layer, x, mask=None):
    """The rule of docs/design.md §8 written out per sequence and per position, in float64:
    slot s of chunk k (anchor a = A[(s + k) % S] or A[s], A[s] = s*C // S) is the softmax
    over the chunk's real tokens at positions <= kC + a of their logits, times the tokens;
    token t (real) is the softmax, over the slots of chunks k-1 and k that are anchored at or
    before t and hold a real token, of its logits, times the expert outputs."""
    x = x.detach().double()
    phi = layer.router.phi.detach().double()  # (D, E, P)
    scale = float(layer.router.scale.detach())
    params = expert_params(layer.experts)
    B, T, D = x.shape
    _, E, P = phi.shape
    S, C = E * P, layer.chunk_size
    xn = x / torch.sqrt((x**2).sum(-1, keepdim=True) + 1e-6)
    phin = (phi / torch.sqrt((phi**2).sum(0, keepdim=True) + 1e-6)).reshape(D, S)
    logits = scale * xn @ phin  # (B, T, S)
    out = torch.zeros(B, T, D, dtype=torch.float64, device=x.device)
    for b in range(B):
        real = [True] * T if mask is None else mask[b].tolist()

        def slot(k, s, real=real):
            a = s * C // S if not layer.rotate else ((s + k) % S) * C // S
            js = [j for j in range(k * C, min(k * C + a + 1, T)) if real[j]]
            return k * C + a, js

        for t in range(T):
            if not real[t]:
                continue
            k = t // C
            cands = []  # (logit, expert output)
            for kk in (k - 1, k):
                if kk < 0:
                    continue
                for s in range(S):
                    g, js = slot(kk, s)
                    if g > t or not js:
                        continue
                    w = softmax_explicit(logits[b, js, s], dim=0)
                    v = (w.unsqueeze(1) * x[b, js]).sum(0)
                    cands.append((logits[b, t, s], expert_mlp(v, params, s // P)))
            if cands:
                cw = softmax_explicit(torch.stack([c[0] for c in cands]), dim=0)
                out[b, t] = sum(w * c[1] for w, c in zip(cw, cands))
    return out


def random_mask(device, B, T, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(B, T, generator=g, device=device) > 0.3
    mask[0] = True  # one sequence without padding
    return mask


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("T,C,E,P", CONFIGS)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_float64_reference(T, C, E, P, rotate, masked, device):
    layer = make(device, C, E, P, rotate=rotate)
    x = randn(device, 3, T, 6, seed=T, dtype=torch.float64)
    mask = random_mask(device, 3, T, T) if masked else None
    y = layer(x, mask)
    # float64: a few reductions of O(10) terms lose ~1e-15 relative; any rule error is O(1e-2).
    torch.testing.assert_close(y, causal_reference(layer, x, mask), rtol=1e-12, atol=1e-12)
    if masked:
        assert (y[~mask] == 0).all()


def future_gradients(layer, x, mask=None, pre=None):
    """For each t, d(r_t . y_t)/dx for a random projection r_t: (T, B, T, D)."""
    x = x.clone().requires_grad_(True)
    y = layer(pre(x) if pre else x, mask)
    r = randn(y.device, *y.shape, seed=1, dtype=y.dtype)
    return torch.stack([torch.autograd.grad((y[:, t] * r[:, t]).sum(), x, retain_graph=True)[0]
                        for t in range(x.shape[1])])


@pytest.mark.parametrize("T,C,E,P", CONFIGS)
@pytest.mark.parametrize("masked", [False, True])
def test_exact_causality_by_gradients(T, C, E, P, masked, device, generator):
    layer = make(device, C, E, P)
    x = torch.randn(2, T, 6, dtype=torch.float64, generator=generator, device=device)
    mask = random_mask(device, 2, T, 3) if masked else None
    ln = torch.nn.LayerNorm(6).double().to(device)  # pre-LN as in a decoder block: a random projection, not a sum
    for pre in (None, ln):
        g = future_gradients(layer, x, mask, pre)  # (T, B, T', D)
        for t in range(T):
            assert (g[t, :, t + 1:] == 0).all(), f"y_{t} depends on the future"
        # not a vacuous pass: each real y_t depends on x_t itself (its own chunk's slot at anchor 0)
        # or on an earlier token, and the gradient reaches past chunk boundaries.
        real = torch.ones(2, T, dtype=torch.bool, device=device) if mask is None else mask
        for t in range(T):
            for b in range(2):
                if real[b, t] and real[b, (t // C) * C]:
                    assert g[t, b, :t + 1].abs().sum() > 0
        k = (T - 1) // C
        if k > 0:  # the last token sees the previous chunk
            assert g[T - 1, 0, (k - 1) * C:k * C].abs().sum() > 0


def test_leaky_soft_moe_fails_the_causality_check(device, generator):
    # The canary: the plain SoftMoE mixes the whole sequence, so the same check must fail on it.
    layer = SoftMoE(6, 2, slots_per_expert=2, hidden_dim=8, impl="reference").double()
    randomize_(layer)
    g = future_gradients(layer.to(device), torch.randn(2, 8, 6, dtype=torch.float64, generator=generator,
                                                       device=device))
    assert g[0, :, 1:].abs().max() > 1e-3


@pytest.mark.parametrize("T,C,E,P", CONFIGS)
def test_past_outputs_bit_identical_when_future_changes(T, C, E, P, device, generator):
    layer = make(device, C, E, P, dtype=torch.float32)
    x = torch.randn(2, T, 6, generator=generator, device=device)
    y = layer(x)
    for t in range(T - 1):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn(2, T - t - 1, 6, generator=generator, device=device) * 3
        assert torch.equal(layer(x2)[:, :t + 1], y[:, :t + 1])
        assert not torch.equal(layer(x2)[:, t + 1:], y[:, t + 1:])


@pytest.mark.parametrize("T,C,E,P", CONFIGS)
def test_expert_evaluations_are_S_per_chunk(T, C, E, P, device, generator):
    layer = make(device, C, E, P)
    seen = []
    layer.experts.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    B = 3
    layer(torch.randn(B, T, 6, dtype=torch.float64, generator=generator, device=device))
    K = -(-T // C)
    assert seen == [(E, P * B * K, 6)]  # E experts x (P slots x B sequences x K chunks) = S per chunk


def test_routing_cost_linear_in_T(device, generator):
    layer = make(device, 8, 4, 1)
    flops = []
    for T in (16, 32, 64):
        with FlopCounterMode(display=False) as fc:
            layer(torch.randn(2, T, 6, dtype=torch.float64, generator=generator, device=device))
        flops.append(fc.get_total_flops())
    assert flops[1] == 2 * flops[0] and flops[2] == 4 * flops[0]  # exactly linear, no T^2 term


def test_per_sequence_independence(device, generator):
    layer = make(device, 6, 4, 1)
    x = torch.randn(4, 13, 6, dtype=torch.float64, generator=generator, device=device, requires_grad=True)
    mask = random_mask(device, 4, 13, 5)
    y = layer(x, mask)
    for b in range(4):
        alone = layer(x[b:b + 1].detach(), mask[b:b + 1])
        torch.testing.assert_close(y[b:b + 1], alone, rtol=1e-13, atol=1e-13)  # float64 rounding only
    g = torch.autograd.grad((y[0] * torch.randn_like(y[0])).sum(), x)[0]
    assert (g[1:] == 0).all() and g[0].abs().sum() > 0


def test_rotation_decouples_slots_from_positions(device, generator):
    layer = make(device, 8, 2, 2)
    S = 4
    anchors = layer.chunk_anchors(2 * S)  # (K, S)
    for s in range(S):  # over S consecutive chunks every slot visits every anchor
        assert sorted(anchors[:S, s].tolist()) == sorted(layer.anchors.tolist())
    fixed = make(device, 8, 2, 2, rotate=False)
    assert (fixed.chunk_anchors(2 * S) == fixed.anchors).all()
    x = torch.randn(2, 20, 6, dtype=torch.float64, generator=generator, device=device)
    y_rot, y_fixed = layer(x), fixed(x)
    torch.testing.assert_close(y_rot[:, :8], y_fixed[:, :8], rtol=0, atol=0)  # chunk 0: same anchors
    assert (y_rot[:, 8:] - y_fixed[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("T,C,E,P", CONFIGS + [(23, 5, 5, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_decoding_equals_parallel_forward(T, C, E, P, rotate, masked, device, generator):
    layer = make(device, C, E, P, rotate=rotate, dtype=torch.float32, impl="fused")
    x = torch.randn(3, T, 6, generator=generator, device=device)
    mask = random_mask(device, 3, T, 7) if masked else None
    y = layer(x, mask)
    state = layer.init_state(3)
    assert all(v.device == x.device for v in vars(state).values() if isinstance(v, torch.Tensor))
    shapes = {k: tuple(v.shape) for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
    steps = []
    for t in range(T):
        y_t, state = layer.step(x[:, t], state, None if mask is None else mask[:, t])
        steps.append(y_t)
        assert {k: tuple(v.shape) for k, v in vars(state).items() if isinstance(v, torch.Tensor)} == shapes
    # float32: the online softmax and the chunked softmax round differently, ~1e-7 on O(1) outputs.
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=0, atol=1e-5)


def test_fp32_routing_under_autocast(device, generator):
    layer = make(device, 4, 2, 2, dtype=torch.float32)
    layer.record_weights = True
    x = torch.randn(2, 10, 6, generator=generator, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
    assert layer.routing_weights["dispatch"].dtype == torch.float32
    assert layer.routing_weights["combine"].dtype == torch.float32
    # bf16 experts: ~1e-2 relative error against the float32 forward
    torch.testing.assert_close(y.float(), layer(x), rtol=0.05, atol=0.05)


def test_impls_agree_and_metrics_published(device, generator):
    x = torch.randn(2, 11, 6, generator=generator, device=device)
    ref, fus = make(device, 4, 2, 2, dtype=torch.float32), make(device, 4, 2, 2, dtype=torch.float32, impl="fused")
    torch.testing.assert_close(fus(x), ref(x), rtol=1e-6, atol=1e-6)  # float32 matmul order only
    model = torch.nn.Sequential(ref)
    with record_routing(model):
        model(x)
    m = collect_metrics(model)
    assert set(m) == {"0/combine_weights_max_mean", "0/combined_slots_mean", "0/dispatch_weights_max_mean"}
    assert 0 < m["0/combine_weights_max_mean"] <= 1 and 1 <= m["0/combined_slots_mean"] <= 8


def test_compile_fullgraph_aot_eager(device, generator):
    torch._dynamo.reset()
    layer = make(device, 4, 2, 2, dtype=torch.float32).eval()
    x = torch.randn(2, 10, 6, generator=generator, device=device)
    mask = random_mask(device, 2, 10, 1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for m in (None, mask):
        torch.testing.assert_close(compiled(x, m), layer(x, m), rtol=0, atol=0)  # eager kernels: bitwise


@pytest.mark.parametrize("kwargs,name", [
    (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=3), "chunk_size"),  # S = 4 > 3
    (dict(chunk_size=2.5), "chunk_size"), (dict(rotate="yes"), "rotate"), (dict(impl="fast"), "impl"),
    (dict(slots_per_expert=0), "slots_per_expert"), (dict(logits_dtype="bf16"), "logits_dtype"),
])
def test_bad_arguments(kwargs, name):
    args = dict(dim=6, num_experts=2, slots_per_expert=2, chunk_size=4) | kwargs
    with pytest.raises(ValueError, match=name):
        CausalSoftMoE(**args)


def test_bad_step_inputs(device):
    layer, other = make(device, 4, 2, 2, dtype=torch.float32), make(device, 4, 2, 2, dtype=torch.float32)
    state = layer.init_state(2)
    with pytest.raises(ValueError, match="x_t"):
        layer.step(torch.randn(2, 5, device=device), state)
    with pytest.raises(ValueError, match="x_t"):
        layer.step(torch.randn(2, 1, 6, device=device), state)
    with pytest.raises(ValueError, match="batch size"):
        layer.step(torch.randn(3, 6, device=device), state)
    with pytest.raises(ValueError, match="another"):
        other.step(torch.randn(2, 6, device=device), state)
    with pytest.raises(ValueError, match="state"):
        layer.step(torch.randn(2, 6, device=device), {"t": 0})
    with pytest.raises(ValueError, match="mask_t"):
        layer.step(torch.randn(2, 6, device=device), state, torch.ones(3, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="batch_size"):
        layer.init_state(0)
    with pytest.raises(ValueError, match="dim"):
        layer(torch.randn(2, 5, 7, device=device))
