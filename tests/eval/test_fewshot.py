"""Few-shot ridge probe (docs/design.md §5) against a direct float64 numpy.linalg.solve reference."""
import numpy as np
import pytest
import torch

from softmoe.eval.fewshot import (RidgeProbe, default_l2_regs, fewshot_evaluate, fewshot_ridge, parse_shots,
                                  select_fewshot)

# Max |W - W_ref| / max |W_ref| over the whole grid. Measured worst case ~1.5e-9 (N = D+1,
# the most ill-conditioned shape); 1e-7 leaves margin and still catches any formula slip
# (a wrong std, bias or regime gives errors of order 1).
RTOL = 1e-7


def reference_weights(x, y, num_classes, l2):
    """The textbook primal solution (X^T X + l I)^-1 X^T Y, always the (D+1) x (D+1) system."""
    mean = x.mean(0, keepdims=True)
    std = x.std(0, keepdims=True) + 1e-5  # population std, as numpy/jnp default
    X = np.concatenate([(x - mean) / std, np.full((x.shape[0], 1), 100.0)], axis=1)
    Y = 2.0 * np.eye(num_classes)[y] - 1.0
    return np.linalg.solve(X.T @ X + l2 * np.eye(X.shape[1]), X.T @ Y), mean, std


def reference_accuracy(x, y, xt, yt, num_classes, l2):
    w, mean, std = reference_weights(x, y, num_classes, l2)
    Xt = np.concatenate([(xt - mean) / std, np.full((xt.shape[0], 1), 100.0)], axis=1)
    return float(((Xt @ w).argmax(1) == yt).mean())


def make_data(n, d, c, rng, m=300):
    centers = rng.normal(size=(c, d)) * 0.7
    y = np.arange(n) % c
    x = centers[y] + rng.normal(size=(n, d)) * 2.0 + 5.0  # offset/scale: standardisation matters
    yt = rng.integers(0, c, size=m)
    xt = centers[yt] + rng.normal(size=(m, d)) * 2.0 + 5.0
    return x, y, xt, yt


@pytest.mark.parametrize("n,d,c,kernel", [(20, 64, 4, True), (240, 16, 6, False), (50, 49, 5, False),
                                          (50, 50, 5, True)])
def test_weights_match_direct_solve(n, d, c, kernel):
    rng = np.random.default_rng(n + d)
    x, y, _, _ = make_data(n, d, c, rng)
    probe = RidgeProbe.fit(torch.tensor(x), torch.tensor(y), c)
    assert probe.kernel is kernel  # N x N system exactly when N < D+1
    for l2 in default_l2_regs():
        w = probe.weights(l2).numpy()
        w_ref, _, _ = reference_weights(x, y, c, l2)
        assert np.abs(w - w_ref).max() <= RTOL * np.abs(w_ref).max(), l2


@pytest.mark.parametrize("n,d,c", [(20, 64, 4), (240, 16, 6)])
def test_accuracies_match_reference_over_grid(n, d, c):
    rng = np.random.default_rng(7 * n + d)
    x, y, xt, yt = make_data(n, d, c, rng)
    res = fewshot_ridge(torch.tensor(x), torch.tensor(y), torch.tensor(xt), torch.tensor(yt), c)
    ref = [reference_accuracy(x, y, xt, yt, c, l2) for l2 in default_l2_regs()]
    assert res["accuracies"] == pytest.approx(ref, abs=1e-12)
    assert res["accuracy"] == max(ref)
    assert res["l2"] == default_l2_regs()[ref.index(max(ref))]  # first (smallest) best strength
    assert res["system"].startswith("kernel" if n < d + 1 else "primal")
    assert 1.0 / c < res["accuracy"] < 1.0  # informative but not trivial data


def test_float32_input_is_promoted():
    rng = np.random.default_rng(3)
    x, y, xt, yt = make_data(30, 40, 3, rng)
    r64 = fewshot_ridge(torch.tensor(x), torch.tensor(y), torch.tensor(xt), torch.tensor(yt), 3)
    r32 = fewshot_ridge(torch.tensor(x).double(), torch.tensor(y), torch.tensor(xt).float().double(),
                        torch.tensor(yt), 3)
    assert r64["accuracies"] == pytest.approx(r32["accuracies"], abs=2 / 300)


def test_grid_is_spec():
    grid = default_l2_regs()
    assert len(grid) == 30 and grid[0] == 2.0**-10 and grid[-1] == 2.0**19


def test_linearly_separable_is_perfect():
    g = torch.Generator().manual_seed(0)
    c, d = 5, 32
    # Every dimension carries class signal: standardisation scales each feature to unit
    # variance, so pure-noise dimensions would be amplified to the signal's level.
    centers = torch.randn(c, d, generator=g) * 5.0
    y = torch.arange(c).repeat_interleave(5)
    x = centers[y] + 0.1 * torch.randn(len(y), d, generator=g)
    yt = torch.arange(c).repeat(40)
    xt = centers[yt] + 0.1 * torch.randn(len(yt), d, generator=g)
    res = fewshot_ridge(x, y, xt, yt, c)
    assert res["accuracy"] == 1.0


def test_select_fewshot_counts_nesting_and_determinism():
    labels = torch.arange(4).repeat_interleave(torch.tensor([7, 9, 30, 5]))
    sel = select_fewshot(labels, 5, seed=1)
    assert sel.shape == (4, 5)
    assert torch.equal(labels[sel], torch.arange(4).unsqueeze(1).expand(4, 5))  # row c = class c
    assert len(set(sel.flatten().tolist())) == 20  # no repeats
    assert torch.equal(sel, select_fewshot(labels, 5, seed=1))  # deterministic
    assert not torch.equal(sel, select_fewshot(labels, 5, seed=2))  # the seed matters
    # Nested: the 3-shot set is the first 3 of the 5-shot set under the same seed.
    assert torch.equal(select_fewshot(labels, 3, seed=1), sel[:, :3])


def test_select_fewshot_error_names_class_and_count():
    labels = torch.arange(3).repeat_interleave(torch.tensor([10, 4, 10]))
    with pytest.raises(ValueError, match=r"shots=5.*class 1 \('dog'\) has 4"):
        select_fewshot(labels, 5, classes=["cat", "dog", "eel"])
    with pytest.raises(ValueError, match=r"class 3 has 0"):  # a class with no image at all
        select_fewshot(labels, 1, num_classes=4)
    with pytest.raises(ValueError, match="shots must be an integer"):
        select_fewshot(labels, 0)


def test_fewshot_evaluate_uses_nested_subsets():
    rng = np.random.default_rng(5)
    c, d, s = 3, 8, 4
    feats = torch.tensor(rng.normal(size=(c, s, d)))
    xt, yt = torch.tensor(rng.normal(size=(50, d))), torch.tensor(rng.integers(0, c, 50))
    out = fewshot_evaluate(feats, xt, yt, [1, 4])
    for shots in (1, 4):
        x = feats[:, :shots].reshape(-1, d)
        y = torch.arange(c).repeat_interleave(shots)
        assert out[shots]["accuracies"] == fewshot_ridge(x, y, xt, yt, c)["accuracies"]
        assert out[shots]["num_train"] == c * shots
    with pytest.raises(ValueError, match="shots=5"):
        fewshot_evaluate(feats, xt, yt, [5])


def test_parse_shots():
    assert parse_shots("25,1, 5,10,5") == [1, 5, 10, 25]
    assert parse_shots("none") == []
    with pytest.raises(ValueError, match="fewshot"):
        parse_shots("1,x")
    with pytest.raises(ValueError, match=">= 1"):
        parse_shots("0,5")
