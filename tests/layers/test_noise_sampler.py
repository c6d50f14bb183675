"""The MoE layers draw their training noise through `noise_sampler` (softmoe/layers/common.py),
and `softmoe.distributed.key_noise_by_global_rows` makes a process holding rows a..b of a global
batch draw exactly the noise one process draws for those rows (docs/design.md §6). Single
process, by construction: the sliced rows equal the rows of the global draw, the RNG advances as
in one process, and a layer run on a slice of the batch equals the global run's rows."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from softmoe.distributed import GlobalRowNoise, key_noise_by_global_rows
from softmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from softmoe.layers.common import standard_normal

D, N, E = 6, 4, 4


def layers(G: int = 1):
    """Noisy layers in float64 (the exact references of this file compare to 1e-12)."""
    return {
        "soft": SoftMoE(D, E, slots_per_expert=2, hidden_dim=8, noise_std=0.7).double(),
        "tokens": TokensChoiceMoE(D, E, hidden_dim=8, k=2, group_size=G, noise_std=1.0,
                                  capacity_multiple_of=None).double(),
        "experts": ExpertsChoiceMoE(D, E, hidden_dim=8, group_size=G, capacity_factor=1.5, noise_std=1.0).double(),
    }


@pytest.mark.parametrize("world,G", [(2, 1), (3, 1), (2, 2), (4, 3)])
def test_global_row_noise_is_the_rows_of_the_global_draw(world, G, device):
    """Each process's sample equals its rows of torch.randn(global shape) drawn from the same
    RNG state, and leaves the RNG where the global draw leaves it."""
    b = 2 * G  # sequences per process
    B = world * b

    def rng_state():
        return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()

    torch.manual_seed(3)
    want = torch.randn(B // G, 5, 3, dtype=torch.float64, device=device)
    after = rng_state()
    for r in range(world):
        torch.manual_seed(3)
        got = GlobalRowNoise(r * b, (r + 1) * b, B)((b // G, 5, 3), torch.float64, device, G)
        assert torch.equal(got, want[r * b // G:(r + 1) * b // G])
        assert torch.equal(rng_state(), after)
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # the global buffer is not kept


@pytest.mark.parametrize("kind", ["soft", "tokens", "experts"])
@pytest.mark.parametrize("world,G", [(2, 1), (3, 1), (2, 2)])
def test_layer_on_its_rows_equals_the_global_run(kind, world, G, device):
    """A noisy layer (training mode) run by "process r" on rows r*b..(r+1)*b-1 with keyed noise
    gives the global run's output rows and auxiliary loss terms; with the default sampler it
    does not (every process would draw the global batch's first rows)."""
    torch.manual_seed(0)
    ref = layers(G)[kind].to(device).train()
    b = 2 * G
    B = world * b
    x = torch.randn(B, N, D, dtype=torch.float64, device=device)
    torch.manual_seed(11)
    y_ref = ref(x)
    for r in range(world):
        par = copy.deepcopy(ref)
        key_noise_by_global_rows(par, (r * b, (r + 1) * b), B)
        torch.manual_seed(11)
        y = par(x[r * b:(r + 1) * b])
        assert (y - y_ref[r * b:(r + 1) * b]).abs().max().item() < 1e-12, (kind, r)
    plain = copy.deepcopy(ref)  # the bug this fixes: local randn gives the last process other noise
    torch.manual_seed(11)
    y = plain(x[(world - 1) * b:])
    assert (y - y_ref[(world - 1) * b:]).abs().max().item() > 1e-6


def test_default_sampler_is_torch_randn_and_rows_none_restores_it():
    layer = layers()["tokens"]
    assert layer.noise_sampler is standard_normal
    torch.manual_seed(5)
    a = standard_normal((3, 2), torch.float32, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(a, torch.randn(3, 2))
    key_noise_by_global_rows(layer, (0, 2), 4)
    assert isinstance(layer.noise_sampler, GlobalRowNoise)
    key_noise_by_global_rows(layer, None)
    assert layer.noise_sampler is standard_normal


@pytest.mark.parametrize("kind", ["soft", "tokens", "experts"])
def test_layer_asks_the_sampler_for_its_groups(kind):
    """The sampler gets (groups, ...) with group_size; an all-zero sample routes as no noise;
    no call in eval mode or with noise_std 0."""
    G = 1 if kind == "soft" else 2
    layer = layers(G)[kind].train()
    calls = []

    def zeros(shape, dtype, device, group_size=1):
        calls.append((shape, dtype, group_size))
        return torch.zeros(shape, dtype=dtype, device=device)

    x = torch.randn(4, N, D, dtype=torch.float64)
    clean = copy.deepcopy(layer)
    clean.noise_std = 0.0
    layer.noise_sampler = zeros
    y = layer(x)
    S = E * 2
    want = (4, N, S) if kind == "soft" else (4 // G, G * N, E)
    assert calls == [(want, torch.float64, G)]
    if kind != "tokens":  # Tokens Choice's load loss exists only with noise; the routing is the same
        assert torch.equal(y, clean(x))
    layer.eval()(x)
    assert len(calls) == 1


def test_a_sampler_of_the_wrong_shape_is_an_error():
    layer = layers()["soft"].train()
    layer.noise_sampler = lambda shape, dtype, device, group_size=1: torch.zeros(1, dtype=dtype)
    with pytest.raises(ValueError, match=r"noise_sampler must return a tensor of shape \(2, 4, 8\)"):
        layer(torch.randn(2, N, D, dtype=torch.float64))


def test_key_noise_checks_group_size_and_rows():
    model = torch.nn.Sequential(layers(G=3)["tokens"])
    with pytest.raises(ValueError, match=r"^0: group_size=3 must divide this process's batch of 4 sequences"):
        key_noise_by_global_rows(model, (4, 8), 8)
    assert model[0].noise_sampler is standard_normal  # nothing changed
    with pytest.raises(ValueError, match="row_stop must be <= global_rows=8"):
        GlobalRowNoise(4, 9, 8)
    with pytest.raises(ValueError, match="row_stop must be an integer >= 5"):
        GlobalRowNoise(4, 4, 8)
    sampler = GlobalRowNoise(0, 4, 8)
    with pytest.raises(ValueError, match="another batch than the one run"):
        sampler((3, 2), torch.float32, torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="group_size=3 must divide"):
        GlobalRowNoise(2, 5, 9)((1, 2), torch.float32, torch.device("cpu"), 3)


def test_keyed_layer_copies_and_pickles():
    layer = key_noise_by_global_rows(layers()["soft"], (2, 4), 4)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert repr(twin.noise_sampler) == "GlobalRowNoise(rows 2..3 of 4)"
