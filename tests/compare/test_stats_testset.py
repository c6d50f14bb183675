"""The paired bootstrap over test examples and seeds (softmoe.compare.stats), on cases whose
answer is computed by hand."""
import math

import numpy as np
import pytest

from softmoe.compare.stats import (CLAIM_MARGIN_EXAMPLES, difference, pack_correct, paired_bootstrap,
                                   unpack_correct)


def hits(n: int, correct: range | list) -> np.ndarray:
    v = np.zeros(n, dtype=bool)
    v[list(correct)] = True
    return v


def test_seed_noise_alone_claims_what_the_test_set_cannot_support():
    # 200 test images; every reference seed is right on images 0..99, every model seed on 0..101:
    # +2 images = +1.00 pp, identical over seeds, so the seed-only rule (Welch SE = 0, 3/3 seeds
    # agree) claims "better". The test set cannot: a resample of 200 images misses both extra
    # images with probability 0.99^200 = 13.4% > 2.5%, so the CI's lower end is exactly 0, and its
    # upper end is the 97.5% quantile of Binomial(200, 0.01) / 200 = 5 / 200 (P(X <= 4) = 0.947,
    # P(X <= 5) = 0.984).
    ref = {s: hits(200, range(100)) for s in range(3)}
    mod = {s: hits(200, range(102)) for s in range(3)}
    seed_only = difference({s: float(v.mean()) for s, v in mod.items()}, {s: float(v.mean()) for s, v in ref.items()})
    assert seed_only.verdict == "better"
    d = paired_bootstrap(mod, ref)
    assert d.diff == pytest.approx(0.01, abs=1e-15)
    assert d.ci == (0.0, 5 / 200)
    assert d.verdict == "no resolvable difference" and d.n_examples == 200 and d.seeds == (3, 3)
    assert d.resolvable == pytest.approx(1.96 * math.sqrt(0.01 / 200), rel=1e-12)  # 2 of 200 disagree
    assert "no resolvable difference" in d.words("dense") and "200 test images" in d.words("dense")


def test_a_large_paired_difference_is_claimed_both_ways():
    # +40 of 200 images (+20 pp): Binomial(200, 0.2) has sd 5.7 images, so the CI is about
    # 40 ± 11 images, far from the 3-image margin.
    ref = {0: hits(200, range(100)), 1: hits(200, range(100))}
    mod = {0: hits(200, range(140)), 1: hits(200, range(140))}
    d = paired_bootstrap(mod, ref)
    assert d.diff == pytest.approx(0.2, abs=1e-15) and d.verdict == "better"
    assert 25 / 200 < d.ci[0] < 0.2 < d.ci[1] < 55 / 200
    w = paired_bootstrap(ref, mod)
    assert w.verdict == "worse" and w.ci == (-d.ci[1], -d.ci[0])  # the same replicates, mirrored


def test_seed_spread_widens_the_interval():
    # 10,000 images: the model's two seeds score 60% and 40% (disjoint halves), the reference 50%
    # twice. Mean difference 0; resampling the model's 2 seeds gives a seed mean of 0.4, 0.5 or
    # 0.6 with probability 1/4, 1/2, 1/4, so the CI reaches about ±10 pp (the test set adds ~0.7 pp).
    n = 10_000
    mod = {0: hits(n, range(6000)), 1: hits(n, range(4000, 8000))}
    ref = {0: hits(n, range(5000)), 1: hits(n, range(5000))}
    d = paired_bootstrap(mod, ref)
    assert d.diff == pytest.approx(0.0, abs=1e-15) and d.verdict == "no resolvable difference"
    assert -0.115 < d.ci[0] < -0.085 and 0.085 < d.ci[1] < 0.115


def test_identical_runs_claim_nothing_and_the_margin_is_a_few_examples():
    same = {0: hits(50, range(30))}
    d = paired_bootstrap(same, same)
    assert d.ci == (0.0, 0.0) and d.verdict == "no resolvable difference" and d.resolvable == 0.0
    # A lead of CLAIM_MARGIN_EXAMPLES - 1 = 2 images of 1000: a resample misses both with
    # probability 0.999^2000 = 13.5% > 2.5%, so the CI's lower end is 0, below the 3-image margin.
    ref = {0: hits(1000, range(500))}
    mod = {0: hits(1000, range(500 + CLAIM_MARGIN_EXAMPLES - 1))}
    d = paired_bootstrap(mod, ref)
    assert d.ci[0] == 0.0 and d.verdict == "no resolvable difference"


def test_fixed_seed_gives_the_same_answer_regardless_of_global_state():
    ref = {s: np.random.default_rng(s).random(300) < 0.5 for s in range(3)}
    mod = {s: np.random.default_rng(10 + s).random(300) < 0.55 for s in range(3)}
    np.random.seed(1)
    a = paired_bootstrap(mod, ref)
    np.random.seed(2)
    assert paired_bootstrap(mod, ref) == a


def test_bad_input_and_packing():
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap({0: hits(10, [1])}, {0: hits(11, [1])})
    with pytest.raises(ValueError, match="at least one run"):
        paired_bootstrap({}, {0: hits(10, [1])})
    v = np.random.default_rng(0).random(1001) < 0.5
    assert np.array_equal(unpack_correct(pack_correct(v), 1001), v)
    with pytest.raises(ValueError, match="1001 examples"):
        unpack_correct(pack_correct(v[:900]), 1001)
