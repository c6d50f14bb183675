"""SoftMoE against the paper's Algorithm 1 (docs/design.md §1) and its promised properties.

Device-agnostic (tests/conftest.py): every layer and tensor is on the `device` under test; the
float64 references compute there too (CUDA has float64), with the same 1e-12 tolerance."""
import math

import pytest
import torch
from torch.func import functional_call

from layers_reference import assert_close64, expert_mlp, expert_params, randomize_, soft_moe_reference
from softmoe import SoftMoE
from softmoe.layers.functional import combine_slots, dispatch_tokens


def make_layer(device, D=6, E=3, P=1, H=5, seed=0, **kw) -> SoftMoE:
    """A float64 layer on `device` with random weights (drawn on the CPU: the same on every device)."""
    layer = SoftMoE(D, E, slots_per_expert=P, hidden_dim=H, **kw).double().eval()
    randomize_(layer, seed=seed)
    with torch.no_grad():
        layer.router.scale.fill_(2.5)  # a non-default scale, so a dropped scale would show
    return layer.to(device)


def tokens(device, B, N, D, seed=1):
    """Tokens (B, N, D) float64 on `device`, drawn there, with very different norms (0.1 .. 10),
    so normalised != un-normalised."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64, device=device)
    scale = torch.empty(B, N, 1, dtype=torch.float64, device=device).uniform_(math.log(0.1), math.log(10), generator=g)
    return x * torch.exp(scale)


# -- Algorithm 1 ----------------------------------------------------------------------------
@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_float64_reference(P, normalize, device):
    layer = make_layer(device, P=P, normalize=normalize)
    x = tokens(device, 3, 7, 6)
    assert_close64(layer(x), soft_moe_reference(layer, x))


def test_dispatches_unnormalised_tokens(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 2, 9, 6)
    y = layer(x)
    assert_close64(y, soft_moe_reference(layer, x))
    # The normalised-dispatch variant (the ports' bug) is far from the layer: the test above
    # can tell the two apart.
    wrong = soft_moe_reference(layer, x, dispatch_normalized=True)
    assert (y - wrong).abs().max() > 1e-2 * y.abs().max()


def test_separable_steps_compose_to_forward(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 2, 5, 6)
    dispatch, combine = layer.router.weights(x)
    slots = dispatch_tokens(x, dispatch, layer.num_experts)
    assert slots.shape == (3, 2 * 2, 6)  # (E, P*B, D)
    y = combine_slots(layer.experts(slots), combine)
    assert torch.equal(y, layer(x))


def test_slot_count_does_not_depend_on_tokens(device):
    layer = make_layer(device, E=4, P=2)
    for N in (3, 8, 20):
        dispatch, _ = layer.router.weights(tokens(device, 2, N, 6))
        assert dispatch.shape == (2, N, 8)
        assert dispatch_tokens(tokens(device, 2, N, 6), dispatch, layer.num_experts).shape == (4, 2 * 2, 6)


# -- softmax axes ---------------------------------------------------------------------------
def test_dispatch_sums_over_tokens_combine_over_all_slots(device):
    layer = make_layer(device, E=3, P=2)  # S = 6 != N = 5, so a swapped axis cannot sum to 1 by chance
    layer.record_weights = True
    layer(tokens(device, 4, 5, 6))
    d, c = layer.routing_weights["dispatch"], layer.routing_weights["combine"]  # (B, N, E, P)
    assert d.shape == c.shape == (4, 5, 3, 2)
    # 1e-12: a sum of <= 6 float64 terms each <= 1.
    torch.testing.assert_close(d.sum(1), torch.ones(4, 3, 2, dtype=torch.float64, device=device), rtol=0, atol=1e-12)
    torch.testing.assert_close(c.sum((2, 3)), torch.ones(4, 5, dtype=torch.float64, device=device), rtol=0, atol=1e-12)
    # Combine is one distribution over all E*P slots, not one per expert.
    assert (c.sum(3) - 1).abs().max() > 0.1


# -- equivariance and independence -------------------------------------------------------------
def test_permutation_equivariant_over_tokens(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 2, 8, 6)
    perm = torch.randperm(8, device=device)
    assert_close64(layer(x[:, perm]), layer(x)[:, perm])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequences_are_independent(dtype, device):
    layer = make_layer(device, P=2).to(dtype)
    x = tokens(device, 4, 7, 6).to(dtype)
    mask = torch.ones(4, 7, dtype=torch.bool, device=device)
    y = layer(x, mask)
    x2, mask2 = x.clone(), mask.clone()
    x2[1:] = 100 * torch.randn_like(x2[1:])  # other sequences: different data and padding
    mask2[2, 3:] = False
    mask2[3] = False
    # Same shapes => same kernels; a sequence's output may not change by a single bit.
    assert torch.equal(layer(x2, mask2)[0], y[0])


# -- initialisation -------------------------------------------------------------------------
def test_phi_init_statistics():
    D, E = 128, 32
    phi = SoftMoE(D, E, slots_per_expert=2).router.phi.detach()
    std = 1 / math.sqrt(D * E)
    # 8192 samples: the std estimate is within ~1% (1 sigma); 5% still catches a missing
    # truncation correction (-12%) or fan_in = D (x5.7).
    assert abs(phi.std().item() / std - 1) < 0.05
    assert phi.abs().max() <= 2 * std / 0.87962566103423978 + 1e-12  # truncated at 2 sigma of the raw normal
    assert abs(phi.mean().item()) < 0.05 * std


def test_routing_near_uniform_at_init(device):
    D, E, N = 384, 128, 196  # Soft MoE-S/16 width and experts, 14x14 tokens
    layer = SoftMoE(D, E).to(device)
    layer.record_weights = True
    x = torch.randn(2, N, D, device=device)
    logits = layer.router(x)
    # Cosine of two random directions in D dims has std 1/sqrt(D) = 0.051 ("logit spread ~0.05").
    assert 0.8 < logits.std().item() * math.sqrt(D) < 1.2
    layer(x)
    c = layer.routing_weights["combine"]  # (B, N, E, 1)
    d = layer.routing_weights["dispatch"]
    # Logits within ~+-0.25 of each other => weights within exp(+-0.25) of uniform.
    assert 0.7 < (c * E).min() and (c * E).max() < 1.4
    assert 0.7 < (d * N).min() and (d * N).max() < 1.4


def test_scale_init_is_one():
    assert SoftMoE(8, 4).router.scale.item() == 1.0


# -- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_input_and_parameters(masked, device):
    layer = make_layer(device, D=3, E=2, P=2, H=3)
    layer.router.scale.data.fill_(1.7)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in layer.named_parameters())
    x = tokens(device, 2, 3, 3).requires_grad_(True)
    mask = torch.tensor([[True, False, True], [True, True, True]], device=device) if masked else None

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x, mask))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


# -- padding mask ---------------------------------------------------------------------------
def test_masked_tokens_get_zero_dispatch_and_zero_output(device):
    layer = make_layer(device, P=2)
    layer.record_weights = True
    x = tokens(device, 2, 6, 6)
    mask = torch.tensor([[True, False, True, True, False, True], [False, True, True, True, True, True]], device=device)
    y = layer(x, mask)
    assert torch.all(layer.routing_weights["dispatch"][~mask] == 0)
    assert torch.all(layer.routing_weights["combine"][~mask] == 0)
    assert torch.all(y[~mask] == 0)


def test_masked_output_equals_output_without_masked_tokens(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 2, 7, 6)
    x[:, 1] *= 50  # the masked tokens are large, so any leak would show
    mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    mask[0, [1, 4]] = False
    mask[1, [1, 2, 6]] = False
    y = layer(x, mask)
    for b in range(2):
        alone = layer(x[b:b + 1, mask[b]])[0]
        assert_close64(y[b, mask[b]], alone)
    assert_close64(y, soft_moe_reference(layer, x, mask))


def test_all_masked_sequence_zero_output_finite_grads(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 2, 5, 6).requires_grad_(True)
    mask = torch.ones(2, 5, dtype=torch.bool, device=device)
    mask[1] = False
    y = layer(x, mask)
    assert torch.all(y[1] == 0)
    assert_close64(y[0], layer(x[:1].detach())[0])
    y.sum().backward()
    assert torch.all(x.grad[1] == 0)
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()


# -- precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_bf16_autocast_routes_in_float32(scale, device):
    layer = SoftMoE(16, 4, slots_per_expert=2).to(device)
    with torch.no_grad():
        layer.router.scale.fill_(scale)
    layer.record_weights = True
    x = torch.randn(2, 10, 16, device=device)
    mask = torch.ones(2, 10, dtype=torch.bool, device=device)
    mask[1, 6:] = False
    ref = layer(x, mask)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x, mask)
    assert layer.routing_weights["dispatch"].dtype == torch.float32
    assert layer.routing_weights["combine"].dtype == torch.float32
    assert y.dtype == torch.bfloat16  # the expert matmuls do run in bf16
    assert torch.isfinite(y).all()
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); a few chained matmuls stay
    # well within 5% of the output range, while broken routing is off by O(1).
    assert (y.float() - ref).abs().max() < 5e-2 * ref.abs().max()


def test_routing_under_autocast_is_the_float32_routing(device):
    # Not just a float32 dtype at the end: the logits and softmaxes must be computed in
    # float32, i.e. bit for bit what the layer computes without autocast.
    layer = SoftMoE(16, 4, slots_per_expert=2).to(device)
    layer.record_weights = True
    x = torch.randn(2, 10, 16, device=device)
    layer(x)
    ref = dict(layer.routing_weights)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        layer(x)
    for key in ("dispatch", "combine"):
        assert torch.equal(layer.routing_weights[key], ref[key]), key


def test_bf16_parameters_and_input_route_in_float32(device):
    layer = SoftMoE(16, 4).bfloat16().to(device)
    layer.record_weights = True
    y = layer(torch.randn(2, 10, 16, dtype=torch.bfloat16, device=device))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert layer.routing_weights["dispatch"].dtype == torch.float32


# -- noise ----------------------------------------------------------------------------------
def test_noise_only_in_training(device):
    layer = make_layer(device, P=2, noise_std=0.5)
    clean = make_layer(device, P=2, noise_std=0.0)
    x = tokens(device, 2, 6, 6)
    assert torch.equal(layer.eval()(x), clean.eval()(x))
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)
    assert (y1 - clean(x)).abs().max() > 1e-6
    clean.train()
    assert torch.equal(clean(x), clean.eval()(x))  # noise_std = 0: training changes nothing


# -- Table 2 ablations ----------------------------------------------------------------------
def test_uniform_dispatch_every_slot_is_the_mean_token(device):
    layer = make_layer(device, E=3, P=2, dispatch="uniform")
    x = tokens(device, 2, 5, 6)
    dispatch, _ = layer.router.weights(x)
    slots = dispatch_tokens(x, dispatch, layer.num_experts)  # (E, P*B, D)
    expected = x.mean(1).repeat(2, 1).expand(3, 4, 6)  # item p*B + b of every expert = mean of sequence b
    assert_close64(slots, expected)
    y = layer(x)
    ref = combine_slots(layer.experts(expected.contiguous()), torch.softmax(layer.router(x), -1))
    assert_close64(y, ref)


def test_uniform_dispatch_with_mask_averages_real_tokens(device):
    layer = make_layer(device, E=2, dispatch="uniform")
    x = tokens(device, 1, 5, 6)
    mask = torch.tensor([[True, False, True, True, False]], device=device)
    slots = dispatch_tokens(x, layer.router.weights(x, mask)[0], layer.num_experts)
    assert_close64(slots, x[0, mask[0]].mean(0).expand(2, 1, 6))


def test_uniform_combine_every_token_gets_the_mean_slot_output(device):
    layer = make_layer(device, E=3, P=2, combine="uniform")
    x = tokens(device, 2, 5, 6)
    dispatch, _ = layer.router.weights(x)
    ys = layer.experts(dispatch_tokens(x, dispatch, layer.num_experts))  # (E, P*B, D)
    mean_slot = ys.view(3, 2, 2, 6).mean((0, 1))  # (E, P, B, D) -> (B, D)
    assert_close64(layer(x), mean_slot.unsqueeze(1).expand(2, 5, 6))


def test_identity_maps_token_i_to_slot_i(device):
    E, P = 3, 2
    layer = make_layer(device, E=E, P=P, dispatch="identity", combine="identity")
    x = tokens(device, 2, E * P, 6)
    params = expert_params(layer.experts)
    expected = torch.stack([torch.stack([expert_mlp(x[b, i], params, i // P) for i in range(E * P)])
                            for b in range(2)])
    assert_close64(layer(x), expected)


def test_identity_needs_tokens_equal_to_slots(device):
    layer = make_layer(device, E=3, P=2, dispatch="identity")
    with pytest.raises(ValueError, match="identity"):
        layer(tokens(device, 1, 5, 6))


# -- metrics --------------------------------------------------------------------------------
def test_metrics_match_weights(device):
    layer = make_layer(device, E=3, P=2)
    layer.record_metrics = layer.record_weights = True
    x = tokens(device, 2, 5, 6)
    mask = torch.tensor([[True, True, False, True, True], [True] * 5], device=device)
    layer(x, mask)
    d = layer.routing_weights["dispatch"].flatten(2)  # (B, N, S)
    c = layer.routing_weights["combine"].flatten(2)
    m = layer.metrics
    cmin = torch.cat([c[b, mask[b]].amin(-1) for b in range(2)]).mean()
    cmax = torch.cat([c[b, mask[b]].amax(-1) for b in range(2)]).mean()
    dmin = torch.stack([d[b, mask[b]].amin(0) for b in range(2)]).mean()
    dmax = torch.stack([d[b, mask[b]].amax(0) for b in range(2)]).mean()
    for key, ref in [("combine_weights_min_mean", cmin), ("combine_weights_max_mean", cmax),
                     ("dispatch_weights_min_mean", dmin), ("dispatch_weights_max_mean", dmax)]:
        assert_close64(m[key], ref)


# -- non-finite input -----------------------------------------------------------------------
def test_nan_stays_within_its_sequence_by_default(device):
    layer = make_layer(device, P=2)
    x = tokens(device, 3, 5, 6)
    clean = layer(x)
    x[1, 2, 0] = float("nan")
    y = layer(x)
    assert torch.isnan(y[1]).all()  # through the softmax over tokens, the whole sequence
    assert torch.equal(y[[0, 2]], clean[[0, 2]])


def test_check_finite_raises(device):
    layer = make_layer(device, check_finite=True)
    x = tokens(device, 2, 4, 6)
    layer(x)  # finite input passes
    for bad in (float("nan"), float("inf")):
        x[1, 1, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            layer(x)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_experts_module_may_return_non_contiguous_tensors(impl, device):
    # An experts replacement (e.g. an expert-parallel wrapper) may hand back non-contiguous
    # outputs; the layer (and its fused backward) must accept them and compute the same thing.
    class Strided(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            y = self.inner(x)  # (E, M, D)
            return y.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides

    torch.manual_seed(0)
    layer = SoftMoE(6, 4, slots_per_expert=2, impl=impl).double().to(device)
    x = torch.randn(3, 5, 6, dtype=torch.float64, requires_grad=True, device=device)
    y = layer(x)
    gx, = torch.autograd.grad(y.square().sum(), x)
    layer.experts = Strided(layer.experts)
    y2 = layer(x)
    gx2, = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(gx2, gx, rtol=0, atol=1e-12)
