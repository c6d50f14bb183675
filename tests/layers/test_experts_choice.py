"""ExpertsChoiceMoE (docs/design.md §2): every expert takes exactly its top-C tokens of the group."""
import pytest
import torch

from layers_reference import assert_close64, expert_mlp, expert_params, randomize_
from softmoe import ExpertsChoiceMoE


def make_layer(D=6, E=4, H=5, seed=0, device="cpu", **kw) -> ExpertsChoiceMoE:
    """float64, eval mode, random weights (drawn on the CPU, the same on every device)."""
    layer = ExpertsChoiceMoE(D, E, hidden_dim=H, **kw).double().eval()
    randomize_(layer, seed=seed)
    return layer.to(device)


def experts_choice_reference(layer, x, C):
    """Loop reference: per group and expert, the C tokens with the largest gate; y[t] +=
    gate * expert(x[t]). Returns the output and, per group, how many experts took each token."""
    B, N, D = x.shape
    G, E = layer.group_size, layer.num_experts
    xg = x.reshape(B // G, G * N, D)
    params = expert_params(layer.experts)
    W = layer.gate.weight.detach().double()
    y = torch.zeros_like(xg)
    counts = torch.zeros(B // G, G * N, device=x.device)
    for r in range(B // G):
        gates = torch.softmax(xg[r] @ W, -1)  # (T, E)
        for e in range(E):
            for t in sorted(range(G * N), key=lambda i: -float(gates[i, e]))[:C]:
                y[r, t] += gates[t, e] * expert_mlp(xg[r, t], params, e)
                counts[r, t] += 1
    return y.reshape(B, N, D), counts


@pytest.mark.parametrize("group_size,cf,C", [(1, 0.9, 2), (1, 2.0, 5), (2, 1.4, 7)])
def test_matches_loop_reference_and_fills_every_expert(group_size, cf, C, device, generator):
    # C = round(T * cf / E): T = 10 -> round(2.25) = 2, round(5.0) = 5; T = 20 -> round(7.0) = 7.
    N, E = 10, 4
    layer = make_layer(E=E, capacity_factor=cf, group_size=group_size, device=device)
    assert layer.capacity_for(N * group_size) == C
    layer.record_weights = layer.record_metrics = True
    x = torch.randn(4, N, 6, dtype=torch.float64, device=device, generator=generator)
    y = layer(x)
    ref, counts = experts_choice_reference(layer, x, C)
    assert_close64(y, ref)
    idx = layer.routing_weights["token_index"]  # (R, E, C)
    assert idx.shape == (4 // group_size, E, C)
    # Exactly C distinct tokens per expert and group.
    assert all(len(set(row.tolist())) == C for row in idx.reshape(-1, C))
    assert layer.aux_loss is None
    # vmoe's metric names and values (per group, then averaged over groups).
    m = layer.metrics
    assert m["num_experts_per_item_min"].item() == pytest.approx(counts.amin(1).mean().item())
    assert m["num_experts_per_item_max"].item() == pytest.approx(counts.amax(1).mean().item())
    for t in (1, 2, 4):
        assert m[f"ratio_processed_items_by_at_least_{t}_experts"].item() == pytest.approx(
            (counts >= t).float().mean().item())
    assert {k for k in m if k.startswith("ratio_processed")} == {
        f"ratio_processed_items_by_at_least_{t}_experts" for t in (1, 2, 4)}


@pytest.mark.parametrize("T,cf,E,C", [(12, 1.0, 5, 2), (12, 1.3, 5, 3), (12, 1.5, 5, 4), (196, 1.0, 128, 2)])
def test_capacity_is_rounded_not_ceiled(T, cf, E, C):
    assert ExpertsChoiceMoE(4, E, capacity_factor=cf).capacity_for(T) == C


def test_capacity_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="capacity"):
        ExpertsChoiceMoE(4, 8, capacity_factor=0.1).capacity_for(4)  # round(0.05) = 0
    with pytest.raises(ValueError, match="capacity"):
        ExpertsChoiceMoE(4, 2, capacity=5)(torch.randn(1, 4, 4))  # more than the 4 tokens
    with pytest.raises(ValueError, match="capacity"):
        ExpertsChoiceMoE(4, 2, capacity=0)


def test_noise_only_in_training(device, generator):
    layer = make_layer(noise_std=1.0, device=device)
    layer.record_weights = True
    x = torch.randn(2, 8, 6, dtype=torch.float64, device=device, generator=generator)
    y = layer(x)
    assert torch.equal(layer(x), y)
    assert_close64(y, experts_choice_reference(layer, x, 2)[0])
    layer.train()
    layer(x)
    assert (layer.routing_weights["gates"] - torch.softmax(x @ layer.gate.weight.detach(), -1)).abs().max() > 1e-4


def test_masked_tokens_are_never_picked_and_output_zero(device, generator):
    layer = make_layer(E=2, capacity=3, device=device)
    layer.record_weights = True
    x = torch.randn(2, 6, 6, dtype=torch.float64, device=device, generator=generator)
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[0, [0, 3]] = False
    y = layer(x, mask)
    idx = layer.routing_weights["token_index"]
    assert not set(idx[0].flatten().tolist()) & {0, 3}
    assert torch.all(y[~mask] == 0)
    # Fewer real tokens than C: the extra picks are masked tokens with weight 0.
    mask[1, 1:] = False
    y = layer(x, mask)
    assert torch.all(y[1, 1:] == 0) and (y[1, 0] != 0).any()
    assert (layer.routing_weights["combine"][1] > 0).sum() == 2  # the real token, once per expert


def test_sequences_independent_with_group_size_one(device, generator):
    layer = make_layer(device=device)
    x = torch.randn(3, 8, 6, dtype=torch.float64, device=device, generator=generator)
    y = layer(x)
    x[1:] = 5 * torch.randn(2, 8, 6, dtype=torch.float64, device=device, generator=generator)
    assert torch.equal(layer(x)[0], y[0])


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size"):
        make_layer(group_size=2)(torch.randn(3, 8, 6, dtype=torch.float64))


def test_gradcheck_input_with_fixed_routing():
    layer = make_layer(D=3, E=3, H=4, capacity=2, noise_std=0.0)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_check_finite_raises():
    layer = make_layer(check_finite=True)
    x = torch.randn(1, 8, 6, dtype=torch.float64)
    x[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
