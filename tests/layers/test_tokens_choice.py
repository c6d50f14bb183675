"""TokensChoiceMoE (V-MoE top-K + BPR, docs/design.md §2): dense equivalence, priority, capacity,
groups, masks and the auxiliary losses against hand-computed values.

Device-agnostic (tests/conftest.py): layers and inputs on the `device` under test; the float64
references compute there (the numpy/scipy one for the auxiliary losses on CPU copies)."""

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from layers_reference import assert_close64, expert_mlp, expert_params, randomize_
from softmoe import SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics, record_routing


def make_layer(device, D=6, E=4, H=5, seed=0, **kw) -> TokensChoiceMoE:
    layer = TokensChoiceMoE(D, E, hidden_dim=H, **kw).double().eval()
    randomize_(layer, seed=seed)
    return layer.to(device)


def hand_gated(device, gates, **kw):
    """A layer whose gate logits are the input itself (D = E, gate.weight = I), and the input
    x = log(gates): softmax(x) = gates, so the test chooses every gate value by hand.
    gates: (B, N, E) rows summing to 1."""
    gates = torch.as_tensor(gates, dtype=torch.float64, device=device)
    E = gates.shape[-1]
    layer = make_layer(device, D=E, E=E, **kw)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.eye(E))
    return layer, gates.log()


def dense_top_k(layer, x):
    """Dense top-K mixture, one token at a time: y = sum over the token's top-K experts of
    gate * expert(x) (what Tokens Choice must give when no choice is dropped)."""
    x = x.double()
    W = layer.gate.weight.detach().double()
    params = expert_params(layer.experts)
    y = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            logits = x[b, n] @ W
            g = torch.exp(logits - logits.max())
            g = g / g.sum()
            for e in sorted(range(len(g)), key=lambda i: -float(g[i]))[: layer.k]:
                y[b, n] += g[e] * expert_mlp(x[b, n], params, e)
    return y


# -- dense equivalence ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch_priority", [True, False])
@pytest.mark.parametrize("group_size", [1, 2])
def test_large_capacity_equals_dense_top_k(k, batch_priority, group_size, device):
    N = 8
    layer = make_layer(device, k=k, batch_priority=batch_priority, group_size=group_size, capacity=N * group_size)
    layer.record_metrics = True
    x = torch.randn(4, N, 6, dtype=torch.float64, device=device)
    assert_close64(layer(x), dense_top_k(layer, x))
    assert layer.metrics["dropped_choices_fraction"] == 0
    # Training with noise_std = 0 routes exactly as eval.
    layer.noise_std = 0.0
    assert_close64(layer.train()(x), dense_top_k(layer, x))


def test_noisy_gates_route_and_combine_only_in_training(device):
    layer = make_layer(device, k=2, capacity=8, noise_std=1.0)
    layer.record_weights = True
    x = torch.randn(2, 8, 6, dtype=torch.float64, device=device)
    y_eval = layer(x)
    assert torch.equal(layer(x), y_eval)
    clean = torch.softmax(x @ layer.gate.weight.detach(), -1)
    assert_close64(layer.routing_weights["gates"], clean)
    layer.train()
    layer(x)
    noisy = layer.routing_weights["gates"]
    assert (noisy - clean).abs().max() > 1e-4
    # Combine weights are the noisy gates of the chosen experts, not renormalised over K.
    chosen = noisy.gather(-1, layer.routing_weights["expert_index"])
    assert_close64(layer.routing_weights["combine"], chosen)
    assert (chosen.sum(-1) < 1 - 1e-3).all()


# -- priority and dropping --------------------------------------------------------------------
# Three tokens, two experts, K = 2, capacity 2; rows are the gates (first choice, second choice).
PRIORITY_CASES = {
    # BPR order = position order here: token 0 (0.9), 1 (0.7), 2 (0.6). First choices fill
    # expert 1 with tokens 1 and 2 before token 0's second choice can take a place there.
    "bpr_in_position_order": (True, [[0.9, 0.1], [0.3, 0.7], [0.4, 0.6]],
                              [[True, False], [True, True], [True, False]], [[0, 2], [0, 1], [1, 2]]),
    # BPR order: token 1 (0.9), 2 (0.7), 0 (0.6).
    "bpr_reordered": (True, [[0.4, 0.6], [0.9, 0.1], [0.3, 0.7]],
                      [[True, False], [True, False], [True, True]], [[1, 2], [0, 2], [0, 1]]),
    # Same gates, vanilla: position order 0, 1, 2.
    "vanilla": (False, [[0.4, 0.6], [0.9, 0.1], [0.3, 0.7]],
                [[True, True], [True, False], [True, False]], [[0, 1], [0, 2], [1, 2]]),
}


@pytest.mark.parametrize("case", PRIORITY_CASES)
def test_first_choices_before_second_choices(case, device):
    bpr, gates, kept, position = PRIORITY_CASES[case]
    layer, x = hand_gated(device, [gates], k=2, capacity=2, batch_priority=bpr)
    layer.record_weights = layer.record_metrics = True
    y = layer(x)
    rw = layer.routing_weights
    assert rw["kept"][0].tolist() == kept
    assert rw["position"][0].tolist() == position
    assert rw["expert_index"][0].tolist() == torch.tensor(gates, device=device).argsort(-1, descending=True).tolist()
    assert layer.metrics["dropped_choices_fraction"].item() == pytest.approx(2 / 6, abs=1e-7)  # a float32 metric
    assert layer.metrics["tokens_unprocessed_fraction"].item() == 0
    # Each token's output: its kept choices only, weighted by their gates.
    params = expert_params(layer.experts)
    for n in range(3):
        ref = sum(rw["combine"][0, n, r] * expert_mlp(x[0, n], params, int(rw["expert_index"][0, n, r]))
                  for r in range(2) if kept[n][r])
        assert_close64(y[0, n], ref)


@pytest.mark.parametrize("bpr,kept", [(True, [False, True, False, True, False]),  # two largest gates
                                      (False, [True, True, False, False, False])])  # two first positions
def test_batch_priority_vs_position_order(bpr, kept, device):
    top = torch.tensor([0.6, 0.9, 0.7, 0.95, 0.55], device=device)  # every token prefers expert 0
    layer, x = hand_gated(device, torch.stack([top, 1 - top], -1)[None], k=1, capacity=2, batch_priority=bpr)
    layer.record_weights = layer.record_metrics = True
    y = layer(x)
    kept = torch.tensor(kept, device=device)
    assert layer.routing_weights["kept"][0, :, 0].tolist() == kept.tolist()
    assert torch.all(y[0, ~kept] == 0)  # a dropped token adds nothing (the residual carries it)
    params = expert_params(layer.experts)
    assert_close64(y[0, kept], top[kept].double().unsqueeze(-1) * expert_mlp(x[0, kept], params, 0))
    assert layer.metrics["dropped_choices_fraction"].item() == pytest.approx(3 / 5, abs=1e-7)
    assert layer.metrics["tokens_unprocessed_fraction"].item() == pytest.approx(3 / 5, abs=1e-7)


# -- capacity -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,T,expected", [
    (dict(k=1, capacity_factor=1.05), 196, 28),  # ceil(25.725) = 26 -> multiple of 4 -> 28
    (dict(k=2, capacity_factor=1.0), 12, 8),  # 2*12/5 = 4.8 -> 5 -> 8
    (dict(k=1, capacity_factor=1.0, capacity_multiple_of=1), 12, 3),  # ceil(2.4)
    (dict(k=1, capacity_factor=1.0, capacity_multiple_of=None), 12, 3),
    (dict(k=1, capacity_factor=1.0, capacity_multiple_of=1, capacity_rounding="round"), 12, 2),  # round(2.4)
    (dict(k=1, capacity_factor=1.3, capacity_multiple_of=1, capacity_rounding="round"), 12, 3),  # round(3.12)
    (dict(k=1, capacity_factor=1.0, capacity_multiple_of=4, capacity_rounding="round"), 12, 4),
    (dict(k=1, capacity=7), 12, 7),  # given directly: not rounded
])
def test_capacity_formula(kw, T, expected):
    E = 8 if T == 196 else 5
    assert TokensChoiceMoE(4, E, **kw).capacity_for(T) == expected


def test_capacity_used_in_forward_follows_group_tokens(device):
    for G, expected in [(1, 2), (2, 3)]:  # T = 6 -> ceil(1.5) = 2; T = 12 -> 3
        layer = make_layer(device, E=4, capacity_factor=1.0, capacity_multiple_of=1, group_size=G)
        layer.record_metrics = True
        layer(torch.randn(2, 6, 6, dtype=torch.float64, device=device))
        assert layer.metrics["capacity"].item() == expected


def test_capacity_below_one_is_an_error(device):
    layer = TokensChoiceMoE(4, 8, capacity_factor=0.1, capacity_rounding="round").to(device)
    with pytest.raises(ValueError, match="capacity"):
        layer.capacity_for(4)  # round(0.05) = 0
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(torch.randn(1, 4, 4, device=device))
    with pytest.raises(ValueError, match="capacity"):
        TokensChoiceMoE(4, 8, capacity=0)


# -- groups ---------------------------------------------------------------------------------
def test_group_shares_capacity(device):
    # Two sequences of two tokens, all preferring expert 0; capacity 2 per group.
    top = torch.tensor([[0.9, 0.8], [0.7, 0.95]], device=device)
    gates = torch.stack([top, 1 - top], -1)
    for G, kept in [(1, [[True, True], [True, True]]), (2, [[True, False], [False, True]])]:
        layer, x = hand_gated(device, gates, k=1, capacity=2, group_size=G)
        layer.record_weights = True
        layer(x)
        assert layer.routing_weights["kept"][..., 0].tolist() == kept


def test_group_equals_concatenated_sequence_and_groups_are_independent(device):
    g2 = make_layer(device, k=2, capacity_factor=1.0, group_size=2)
    g1 = make_layer(device, k=2, capacity_factor=1.0, group_size=1)  # same seed => same parameters
    x = torch.randn(4, 5, 6, dtype=torch.float64, device=device)
    y = g2(x)
    assert_close64(y, g1(x.reshape(2, 10, 6)).reshape(4, 5, 6))
    x2 = x.clone()
    x2[2:] = torch.randn(2, 5, 6, dtype=torch.float64, device=device)
    assert torch.equal(g2(x2)[:2], y[:2])


def test_group_size_must_divide_batch(device):
    layer = make_layer(device, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        layer(torch.randn(4, 5, 6, dtype=torch.float64, device=device))


@pytest.mark.parametrize("cls_kw", [dict(), dict(capacity=3)])
def test_sequences_independent_with_group_size_one(cls_kw, device):
    layer = make_layer(device, k=2, **cls_kw)
    x = torch.randn(3, 6, 6, dtype=torch.float64, device=device)
    y = layer(x)
    x[1:] *= -3
    assert torch.equal(layer(x)[0], y[0])


# -- masks ----------------------------------------------------------------------------------
def test_masked_tokens_take_no_capacity_and_output_zero(device):
    top = torch.tensor([0.99, 0.8, 0.7], device=device)  # the masked token 0 has the largest gate
    layer, x = hand_gated(device, torch.stack([top, 1 - top], -1)[None], k=1, capacity=1)
    layer.record_weights = True
    mask = torch.tensor([[False, True, True]], device=device)
    y = layer(x, mask)
    assert layer.routing_weights["kept"][0, :, 0].tolist() == [False, True, False]
    assert torch.all(y[0, 0] == 0)


def test_masked_output_equals_output_without_masked_tokens(device):
    layer = make_layer(device, k=2, capacity=8)
    x = torch.randn(2, 8, 6, dtype=torch.float64, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device)
    mask[0, [2, 5]] = False
    mask[1, 7] = False
    y = layer(x, mask)
    assert torch.all(y[~mask] == 0)
    for b in range(2):
        assert_close64(y[b, mask[b]], layer(x[b:b + 1, mask[b]])[0])


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_all_padding_group_gives_finite_losses_and_gradients(impl, device):
    # A routing group with no real token has all-zero importance and load: its CV^2 is 0 (not
    # 0/0 = NaN), and the other groups' losses and gradients are those of the batch without it.
    torch.manual_seed(0)
    layer = TokensChoiceMoE(6, num_experts=4, k=2, capacity=8, impl=impl).double().train().to(device)
    x = torch.randn(3, 8, 6, dtype=torch.float64, requires_grad=True, device=device)
    mask = torch.ones(3, 8, dtype=torch.bool, device=device)
    mask[1] = False  # sequence (group) 1 is all padding
    torch.manual_seed(1)
    y = layer(x, mask)
    aux = layer.aux_loss
    (y.square().sum() + aux).backward()
    assert torch.isfinite(aux) and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert torch.all(x.grad[1] == 0) and torch.all(y[1] == 0)


# -- auxiliary losses -------------------------------------------------------------------------
def cv2(v):
    return np.var(v) / np.mean(v) ** 2  # population variance, as vmoe


def aux_reference(layer, x, mask, noise):
    """Per-group V-MoE losses from the formulas, in numpy float64, averaged over groups."""
    B, N, D = x.shape
    G, E, K = layer.group_size, layer.num_experts, layer.k
    R = B // G
    xg = x.reshape(R, G * N, D).cpu().numpy()
    mg = np.ones((R, G * N), bool) if mask is None else mask.reshape(R, G * N).cpu().numpy()
    W = layer.gate.weight.detach().double().cpu().numpy()
    sd = layer.noise_std / E
    out = {"importance_loss": [], "load_loss": [], "gshard_loss": []}
    for r in range(R):
        real = mg[r]
        logits = xg[r][real] @ W  # (n, E)
        noisy = logits + sd * noise[r][real].cpu().numpy()
        gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        ngates = np.exp(noisy) / np.exp(noisy).sum(-1, keepdims=True)
        out["importance_loss"].append(cv2(gates.sum(0)))
        threshold = np.sort(noisy, -1)[:, -K][:, None]  # K-th largest noisy logit per token
        p = norm.sf((threshold - logits) / sd)  # P(expert in top-K under fresh noise) = 1 - Phi
        out["load_loss"].append(cv2(p.mean(0)))
        top1 = np.eye(E)[ngates.argmax(-1)]
        out["gshard_loss"].append(E**2 * np.mean(top1.mean(0) * ngates.mean(0)))
    return {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("masked", [False, True])
def test_aux_losses_equal_hand_computed(masked, device):
    B, N, E, K, G = 4, 5, 4, 2, 2
    weights = dict(importance_loss_weight=0.3, load_loss_weight=0.7, gshard_loss_weight=0.11)
    layer = make_layer(device, E=E, k=K, group_size=G, noise_std=1.0, **weights).train()
    with torch.no_grad():
        layer.gate.weight.mul_(0.3)  # moderate logits so noise_std/E = 0.25 noise matters
    layer.record_metrics = layer.record_weights = True
    x = torch.randn(B, N, 6, dtype=torch.float64, device=device)
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
        mask[0, 1] = mask[3, 2:] = False
    torch.manual_seed(123)
    layer(x, mask)
    torch.manual_seed(123)
    noise = torch.randn(B // G, G * N, E, dtype=torch.float64, device=device)  # the draw the layer made
    # The replayed noise reproduces the layer's noisy gates (so the reference uses the same draw).
    logits = x.reshape(B // G, G * N, 6) @ layer.gate.weight.detach()
    assert_close64(layer.routing_weights["gates"].reshape(B // G, G * N, E),
                   torch.softmax(logits + noise / E, -1))
    ref = aux_reference(layer, x, mask, noise)
    # 1e-10: float64 sums over <= 10 tokens and an erfc; the reference uses scipy's ndtr.
    for name, value in ref.items():
        assert layer.metrics[name].item() == pytest.approx(value, rel=1e-10, abs=1e-14), name
    total = 0.3 * ref["importance_loss"] + 0.7 * ref["load_loss"] + 0.11 * ref["gshard_loss"]
    assert layer.aux_loss.item() == pytest.approx(total, rel=1e-10)
    layer.aux_loss.backward()
    assert layer.gate.weight.grad.abs().sum() > 0


def test_aux_loss_none_in_eval_or_with_zero_weights(device):
    layer = make_layer(device)
    layer(torch.randn(2, 5, 6, dtype=torch.float64, device=device))
    assert layer.aux_loss is None
    layer = make_layer(device, importance_loss_weight=0.0, load_loss_weight=0.0).train()
    layer(torch.randn(2, 5, 6, dtype=torch.float64, device=device))
    assert layer.aux_loss is None


def test_no_load_loss_without_noise(device):
    layer = make_layer(device, noise_std=0.0, importance_loss_weight=0.2, load_loss_weight=5.0).train()
    layer.record_metrics = True
    x = torch.randn(2, 5, 6, dtype=torch.float64, device=device)
    layer(x)
    assert "load_loss" not in layer.metrics
    assert layer.aux_loss.item() == pytest.approx(0.2 * layer.metrics["importance_loss"].item(), rel=1e-12)


def test_collect_aux_loss_over_several_layers(device):
    torch.manual_seed(0)
    model = nn.Sequential(TokensChoiceMoE(6, 4, hidden_dim=8), SoftMoE(6, 4, hidden_dim=8),
                          TokensChoiceMoE(6, 4, hidden_dim=8, k=2, gshard_loss_weight=0.1)).train().to(device)
    zero = collect_aux_loss(model)  # nothing has run yet: a zero that adds to any loss
    assert zero.shape == () and zero.dtype == torch.float32 and zero.item() == 0 and not zero.requires_grad
    with record_routing(model) as layers:
        assert len(layers) == 3 and all(m.record_metrics for m in layers)
        y = model(torch.randn(2, 5, 6, device=device))
    assert not any(m.record_metrics for m in layers)  # flags restored
    total = collect_aux_loss(model)
    assert model[1].aux_loss is None
    torch.testing.assert_close(total, model[0].aux_loss + model[2].aux_loss, rtol=0, atol=0)
    (y.sum() + total).backward()
    assert model[0].gate.weight.grad.abs().sum() > 0
    metrics = collect_metrics(model)
    assert {"0/importance_loss", "0/load_loss", "2/gshard_loss", "1/combine_weights_min_mean"} <= set(metrics)
    assert metrics["0/importance_loss"] == model[0].metrics["importance_loss"].item()
    assert collect_aux_loss(nn.Linear(2, 2).double()).dtype == torch.float64  # the model's (routing) dtype
    assert collect_aux_loss(nn.Linear(2, 2).to("meta")).device.type == "meta"  # and device
    model.eval()
    model(torch.randn(2, 5, 6, device=device))
    loss = torch.tensor(1.5, device=device) + collect_aux_loss(model)  # the README's line, in eval mode (no aux loss)
    assert loss.item() == 1.5


# -- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("capacity", [6, 1])  # every choice kept / most dropped
def test_gradcheck_input_with_fixed_routing(capacity, device):
    layer = make_layer(device, D=3, E=3, H=4, k=2, capacity=capacity, noise_std=0.0)
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True, device=device)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_check_finite_raises(device):
    layer = make_layer(device, check_finite=True)
    x = torch.randn(1, 4, 6, dtype=torch.float64, device=device)
    x[0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
