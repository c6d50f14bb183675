"""Bad input to any of the three layers: a ValueError that names the argument.

Device-agnostic (tests/conftest.py): the layers and every input on the `device` under test;
the constructor checks create no tensors."""
import pytest
import torch

from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

LAYERS = {
    "soft": lambda **kw: SoftMoE(8, 4, hidden_dim=8, **kw),
    "tokens": lambda **kw: TokensChoiceMoE(8, 4, hidden_dim=8, **kw),
    "experts": lambda **kw: ExpertsChoiceMoE(8, 4, hidden_dim=8, **kw),
}


@pytest.fixture(params=list(LAYERS))
def layer(request, device):
    return LAYERS[request.param]().to(device)


@pytest.mark.parametrize("shape", [(8,), (5, 8), (1, 2, 5, 8)])
def test_wrong_rank(layer, shape, device):
    with pytest.raises(ValueError, match=r"x must have shape \(batch, tokens, dim=8\)"):
        layer(torch.randn(shape, device=device))


def test_wrong_width(layer, device):
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must equal dim=8"):
        layer(torch.randn(2, 5, 7, device=device))


def test_no_tokens_or_integer_input(layer, device):
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(2, 0, 8, device=device))
    with pytest.raises(ValueError, match="floating-point"):
        layer(torch.ones(2, 4, 8, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="torch.Tensor"):
        layer([[[0.0] * 8]])


def test_mask_shape_and_dtype(layer, device, generator):
    x = torch.randn(2, 4, 8, generator=generator, device=device)
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, tokens\) = \(2, 4\)"):
        layer(x, torch.ones(2, 5, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        layer(x, torch.ones(2, 4, 1, dtype=torch.bool, device=device))
    with pytest.raises(ValueError, match="mask must be a torch.bool tensor"):
        layer(x, torch.ones(2, 4, device=device))
    layer(x, torch.ones(2, 4, dtype=torch.bool, device=device))  # the right mask passes


def test_check_finite(layer, device, generator):
    layer.check_finite = True
    x = torch.randn(2, 4, 8, generator=generator, device=device)
    x[1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="check_finite=True"):
        layer(x)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("name", ["dim", "num_experts", "hidden_dim"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_sizes_must_be_positive_ints(kind, name, value):
    args = dict(dim=8, num_experts=4, hidden_dim=8) | {name: value}
    cls = {"soft": SoftMoE, "tokens": TokensChoiceMoE, "experts": ExpertsChoiceMoE}[kind]
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        cls(**args)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_noise_std_must_be_nonnegative(kind):
    for bad in (-0.1, float("nan"), "1"):
        with pytest.raises(ValueError, match="noise_std"):
            LAYERS[kind](noise_std=bad)


@pytest.mark.parametrize("kw,name", [
    (dict(slots_per_expert=0), "slots_per_expert"),
    (dict(dispatch="hard"), "dispatch"),
    (dict(combine="mean"), "combine"),
    (dict(expert_init="zeros"), "expert_init"),
])
def test_soft_moe_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        LAYERS["soft"](**kw)


@pytest.mark.parametrize("kw,name", [
    (dict(k=5), "k must be <= num_experts=4"),
    (dict(k=0), "k must be an integer >= 1"),
    (dict(capacity=0), "capacity must be an integer >= 1"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=None), "capacity_factor"),
    (dict(capacity_multiple_of=0), "capacity_multiple_of"),
    (dict(capacity_rounding="floor"), "capacity_rounding"),
    (dict(group_size=0), "group_size"),
    (dict(importance_loss_weight=-1.0), "importance_loss_weight"),
    (dict(load_loss_weight=float("inf")), "load_loss_weight"),
    (dict(gshard_loss_weight=-0.5), "gshard_loss_weight"),
])
def test_tokens_choice_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        LAYERS["tokens"](**kw)


@pytest.mark.parametrize("kw,name", [
    (dict(capacity=0), "capacity must be an integer >= 1"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(group_size=0), "group_size"),
])
def test_experts_choice_arguments(kw, name):
    with pytest.raises(ValueError, match=name):
        LAYERS["experts"](**kw)


@pytest.mark.parametrize("kind", ["tokens", "experts"])
def test_group_size_not_dividing_batch(kind, device):
    with pytest.raises(ValueError, match="group_size=2 must divide the batch size, got batch size 3"):
        LAYERS[kind](group_size=2).to(device)(torch.randn(3, 4, 8, device=device))
