"""The layers inside torch's machinery: the meta device, saved-tensor hooks (`save_on_cpu`),
activation checkpointing, `copy.deepcopy` after a training step, empty batches, and input
validation. Each for SoftMoE (fused and reference), Tokens Choice and Experts Choice."""
import contextlib
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_metrics, record_routing

D, E, H = 8, 4, 16

LAYERS = {
    "soft": lambda impl="fused": SoftMoE(D, E, slots_per_expert=2, hidden_dim=H, impl=impl),
    "soft_noise": lambda impl="fused": SoftMoE(D, E, hidden_dim=H, noise_std=0.5, impl=impl),
    "soft_reference": lambda impl="reference": SoftMoE(D, E, slots_per_expert=2, hidden_dim=H, impl=impl),
    "tokens": lambda impl="fused": TokensChoiceMoE(D, E, hidden_dim=H, k=2, capacity_factor=1.0, impl=impl),
    "experts": lambda impl="fused": ExpertsChoiceMoE(D, E, hidden_dim=H, group_size=2, impl=impl),
}
ABLATIONS = [dict(dispatch=d, combine=c) for d in ("soft", "uniform", "identity")
             for c in ("soft", "uniform", "identity") if (d, c) != ("soft", "soft")]


def make(kind, seed=0):
    torch.manual_seed(seed)
    layer = LAYERS[kind]()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def data(B=4, N=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 4:] = False
    return torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), mask


# -- meta device ------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_forward_on_meta(kind, train):
    layer = LAYERS[kind]().to("meta").train(train)
    x = torch.empty(4, 6, D, device="meta", requires_grad=train)
    mask = torch.ones(4, 6, dtype=torch.bool, device="meta")
    with record_routing(layer, weights=True):
        y = layer(x, mask)
    assert y.shape == x.shape and y.device.type == "meta"
    if train:
        y.sum().backward()  # the backward traces on meta too
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda a: f"{a['dispatch']}-{a['combine']}")
def test_ablations_on_meta(ablation):
    layer = SoftMoE(D, E, hidden_dim=H, **ablation).to("meta")
    assert layer(torch.empty(2, E, D, device="meta")).shape == (2, E, D)


def test_the_issue_example_on_meta():
    assert SoftMoE(16, 4).to("meta")(torch.empty(2, 8, 16, device="meta")).shape == (2, 8, 16)


# -- saved-tensor hooks -----------------------------------------------------------------------
def tensor_attributes(root):
    """Tensors that graph nodes keep as plain Python attributes (outside saved-tensor hooks)."""
    seen, stack, found = set(), [root.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        found += [(type(fn).__name__, k) for k, v in getattr(fn, "__dict__", {}).items() if isinstance(v, torch.Tensor)]
        stack.extend(f for f, _ in fn.next_functions)
    return found


@pytest.mark.parametrize("kind", ["soft", "tokens", "experts"])
def test_every_activation_passes_through_saved_tensor_hooks(kind):
    layer = make(kind).train()
    x, dy, mask = data()
    x = x.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: packed[i]):
        y = layer(x, mask)
    assert not tensor_attributes(y)  # no graph node holds a tensor outside the hooks
    B, N = x.shape[:2]
    if kind == "soft":
        M = layer.slots_per_expert * B
    else:
        M = B // layer.group_size * layer.capacity_for(layer.group_size * N)
    # The experts' two (E, M, H) activations, h and gelu(h), are the largest; both are packed.
    hidden = [t for t in packed if tuple(t.shape) == (E, M, H) and not isinstance(t, torch.nn.Parameter)]
    assert len(hidden) == 2, [tuple(t.shape) for t in packed]
    packed_bytes = sum(t.nbytes for t in packed)
    assert packed_bytes >= 2 * E * M * H * 4
    y.backward(dy)


@pytest.mark.parametrize("kind", ["soft", "soft_reference", "tokens", "experts"])
def test_save_on_cpu_gives_the_same_gradients(kind):
    x, dy, mask = data()
    grads = []
    for hooks in (False, True):
        layer = make(kind).train()
        xg = x.clone().requires_grad_()
        torch.manual_seed(3)  # the same noise in both runs
        with torch.autograd.graph.save_on_cpu() if hooks else contextlib.nullcontext():
            y = layer(xg, mask)
        y.backward(dy)
        grads.append([y.detach(), xg.grad] + [p.grad for p in layer.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_retained_graph_second_backward_under_identity_hooks():
    # The hooks hand back the very tensors saved: the fused experts must not have written over
    # them in the first backward of a retained graph.
    layer = make("soft").train()
    x, dy, _ = data()
    x = x.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = layer(x)
    y.backward(dy, retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    y.backward(dy)
    for got, one in zip([x.grad] + [p.grad for p in layer.parameters()], first):
        torch.testing.assert_close(got, 2 * one, rtol=1e-6, atol=1e-6)


# -- activation checkpointing -----------------------------------------------------------------
def routing_outputs(layer):
    aux = layer.aux_loss
    return (None if aux is None else aux.detach().clone()), dict(layer.metrics)


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize("kind", ["soft", "soft_noise", "soft_reference", "tokens", "experts"])
def test_checkpointed_layer_equals_plain(kind, early_stop):
    x, dy, mask = data()
    results = []
    for ckpt in (False, True):
        layer = make(kind).train()
        xg = x.clone().requires_grad_()
        torch.manual_seed(7)  # the same noise; checkpoint replays the RNG state in its recompute
        # The backward inside record_routing, and without early stop, the recompute runs the
        # layer's whole forward again, recording included.
        with record_routing(layer), set_checkpoint_early_stop(early_stop):
            y = checkpoint(layer, xg, mask, use_reentrant=False) if ckpt else layer(xg, mask)
            before = layer.aux_loss, dict(layer.metrics)
            loss = (y * dy).sum() + collect_aux_loss(layer)
            loss.backward()
        assert layer.aux_loss is before[0]  # the recompute in the backward left them alone
        assert all(layer.metrics[k] is v for k, v in before[1].items())
        results.append([y.detach(), xg.grad, *routing_outputs(layer)] + [p.grad for p in layer.parameters()])
    plain, ckpt = results
    assert plain[3].keys() == ckpt[3].keys() and plain[3]
    for key in plain[3]:
        torch.testing.assert_close(ckpt[3][key], plain[3][key], rtol=0, atol=0)
    for got, want in zip(ckpt[:3] + ckpt[4:], plain[:3] + plain[4:]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# -- deepcopy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYERS))
def test_deepcopy_after_a_training_forward(kind):
    layer = make(kind).train()
    x, dy, mask = data()
    with record_routing(layer, weights=True):
        y = layer(x.requires_grad_(), mask)
    twin = copy.deepcopy(layer)  # EMA / snapshot code does this while the graph is alive
    if layer.aux_loss is not None:
        assert twin.aux_loss.grad_fn is None and torch.equal(twin.aux_loss, layer.aux_loss.detach())
    assert collect_metrics(twin) == collect_metrics(layer)
    (y * dy).sum().backward()  # the original graph is intact
    for a, b in zip(twin.state_dict().values(), layer.state_dict().values()):
        assert torch.equal(a, b)


# -- empty batch ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(LAYERS))
def test_empty_batch(kind):
    layer = make(kind).train()
    x = torch.randn(0, 6, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 6, D)
    y.sum().backward()
    assert x.grad.shape == (0, 6, D)
    with torch.no_grad():
        assert layer.eval()(x, torch.ones(0, 6, dtype=torch.bool)).shape == (0, 6, D)


def test_the_issue_example_empty_batch():
    assert SoftMoE(16, 4)(torch.randn(0, 8, 16)).shape == (0, 8, 16)


# -- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TokensChoiceMoE, ExpertsChoiceMoE])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -1.0, 0, "1.0", True])
def test_non_finite_capacity_factor_is_rejected(cls, bad):
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0"):
        cls(D, E, capacity_factor=bad)


@pytest.mark.parametrize("kind", ["soft", "tokens", "experts"])
def test_dtype_and_mask_device_mismatch(kind):
    layer = make(kind)
    x, _, mask = data()
    with pytest.raises(ValueError, match=r"x.dtype must equal the layer's parameter dtype torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match=r"x.dtype must equal .* got torch.bfloat16"):
        layer(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.bfloat16(), mask).shape == x.shape  # under autocast: allowed
    with pytest.raises(ValueError, match=r"mask must be on x's device cpu, got meta"):
        layer(x, mask.to("meta"))
