"""The stacked expert MLPs: math (tanh GELU, per-expert weights) and initialisation."""
import math

import pytest
import torch

from layers_reference import assert_close64, expert_mlp, expert_params, randomize_
from softmoe import Experts


def test_forward_is_each_expert_mlp(device, generator):
    experts = Experts(3, 5, 7).double()
    randomize_(experts, std=1.0)
    experts.to(device)
    # large pre-activations: tanh GELU != erf GELU
    x = 3 * torch.randn(3, 4, 5, dtype=torch.float64, device=device, generator=generator)
    params = expert_params(experts)
    expected = torch.stack([expert_mlp(x[e], params, e) for e in range(3)])
    assert_close64(experts(x), expected)


def test_gelu_is_the_tanh_approximation(device):
    # One expert, identity-like weights: y = gelu(h); the erf GELU differs by up to ~1e-3.
    experts = Experts(1, 1, 1).double().to(device)
    with torch.no_grad():
        experts.w1.fill_(1.0), experts.w2.fill_(1.0), experts.b1.zero_(), experts.b2.zero_()
    h = torch.linspace(-4, 4, 41, dtype=torch.float64, device=device).view(1, -1, 1)
    y = experts(h)
    assert_close64(y, 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))))
    assert (y - torch.nn.functional.gelu(h)).abs().max() > 1e-4


def test_identical_vs_distinct_init():
    E, D, H = 4, 32, 64
    same = Experts(E, D, H, expert_init="identical")
    diff = Experts(E, D, H, expert_init="distinct")
    for w in (same.w1, same.w2):
        assert all(torch.equal(w[0], w[e]) for e in range(1, E))
    for w in (diff.w1, diff.w2):
        assert not any(torch.equal(w[0], w[e]) for e in range(1, E))
    bound = math.sqrt(6 / (D + H))  # xavier-uniform over (fan_in, fan_out) of one expert
    for w in (same.w1, same.w2, diff.w1, diff.w2):
        assert w.abs().max() <= bound
        # Uniform(-b, b) has std b/sqrt(3); >= 2048 samples per expert -> ~2% error, 10% margin.
        assert abs(w[0].std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    for b in (same.b1, same.b2, diff.b1, diff.b2):
        assert b.abs().max() < 1e-5  # N(0, 1e-6): effectively zero


def test_bad_arguments():
    with pytest.raises(ValueError, match="expert_init"):
        Experts(2, 4, 4, expert_init="random")
    for kw, name in [(dict(num_experts=0), "num_experts"), (dict(dim=0), "dim"), (dict(hidden_dim=-1), "hidden_dim")]:
        args = dict(num_experts=2, dim=4, hidden_dim=4) | kw
        with pytest.raises(ValueError, match=name):
            Experts(**args)


def test_layers_pass_expert_init_through():
    from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
    for cls in (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE):
        default, distinct = cls(8, 3), cls(8, 3, expert_init="distinct")
        assert torch.equal(default.experts.w1[0], default.experts.w1[2])  # vmoe: identical by default
        assert not torch.equal(distinct.experts.w1[0], distinct.experts.w1[2])
        assert default.experts.hidden_dim == 32  # H defaults to 4 * dim
