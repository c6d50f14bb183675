"""The statistics of a comparison: per-model summaries over seeds and each model's
difference to the dense baseline, with a verdict that claims only what the runs support.

Rules (stated in every report):
  - spread is the sample standard deviation (n - 1 in the denominator);
  - a difference to dense is `mean(model) - mean(dense)` with the standard error of a
    difference of two independent means, `sqrt(s_m^2 / n_m + s_d^2 / n_d)` (Welch; seeds
    change initialisation and data order of both models, so the runs are not paired);
  - the verdict claims a difference only when |difference| > 2 standard errors AND the
    seed-by-seed differences (runs with the same seed, where both have it) all have that sign;
    otherwise it says "no clear difference". With fewer than 2 runs on either side there is
    no standard error and no claim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Mapping, Sequence

SE_THRESHOLD = 2.0


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float | None  # None when n < 2

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation (None below two values) of `values`."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one value, got none")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"summarize needs finite values, got {vals}")
    n = len(vals)
    mean = math.fsum(vals) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return Summary(n, mean, std)


@dataclass(frozen=True)
class Difference:
    diff: float  # mean(model) - mean(reference)
    se: float | None  # standard error of that difference; None with fewer than 2 runs on a side
    paired_signs: tuple[int, ...]  # sign of model - reference for each seed both have, in seed order
    verdict: str  # "better", "worse", "no clear difference" or "too few runs"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["paired_signs"] = list(self.paired_signs)
        return d

    def words(self, reference: str, unit: str = "pp", scale: float = 100.0) -> str:
        """Plain words, e.g. "better than dense by +1.23 pp (SE 0.40, 3/3 seeds agree)"."""
        if self.verdict == "too few runs":
            return f"too few runs for a verdict (need at least 2 seeds of it and of {reference})"
        se = f"SE {scale * self.se:.2f}" if self.se is not None else "no SE"
        agree = sum(1 for s in self.paired_signs if s == (1 if self.diff > 0 else -1))
        seeds = f"{agree}/{len(self.paired_signs)} seeds agree"
        delta = f"{scale * self.diff:+.2f} {unit}"
        if self.verdict in ("better", "worse"):
            return f"{self.verdict} than {reference} by {delta} ({se}, {seeds})"
        return f"no clear difference from {reference}: {delta} ({se}, {seeds})"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def difference(model: Mapping[int, float], reference: Mapping[int, float], higher_is_better: bool = True) -> Difference:
    """Difference of a model's runs to the reference's, both `{seed: value}`; see the module
    docstring for the rule. `higher_is_better` says which sign is "better"."""
    if not model or not reference:
        raise ValueError("difference needs at least one run of the model and of the reference")
    a, b = summarize(list(model.values())), summarize(list(reference.values()))
    diff = a.mean - b.mean
    signs = tuple(_sign(model[s] - reference[s]) for s in sorted(set(model) & set(reference)))
    if a.std is None or b.std is None:
        return Difference(diff, None, signs, "too few runs")
    se = math.sqrt(a.std**2 / a.n + b.std**2 / b.n)
    direction = _sign(diff)
    clear = (direction != 0 and abs(diff) > SE_THRESHOLD * se and len(signs) >= 2
             and all(s == direction for s in signs))
    if not clear:
        return Difference(diff, se, signs, "no clear difference")
    better = (direction > 0) == higher_is_better
    return Difference(diff, se, signs, "better" if better else "worse")


# -- statistics that count the test set ---------------------------------------------------------
# A comparison scored on a finite test set has two sources of noise: the seeds (initialisation,
# data order) and the test examples themselves (another draw of n images would give other
# accuracies). `paired_bootstrap` resamples both: each replicate draws n test examples with
# replacement (the SAME examples for both models: they were scored on the same images, so the
# comparison is paired) and, independently for each model, its seeds with replacement; the
# statistic is mean-over-seeds accuracy of the model minus that of the reference. The 95%
# percentile interval of the replicates is the CI. A difference is claimed only when the CI
# excludes 0 by at least CLAIM_MARGIN_EXAMPLES / n (a few examples' worth): a verdict then
# cannot flip when float rounding on another machine changes one or two predictions.
BOOTSTRAP_SEED = 0  # fixed: the same replicates, hence the same verdict, on every machine
BOOTSTRAP_REPLICATES = 2000
CLAIM_MARGIN_EXAMPLES = 3
CI_LEVEL = 0.95


def pack_correct(correct) -> str:
    """A per-example correctness vector (bool, (n,)) as compact text (base64 of the packed bits)."""
    import base64

    import numpy as np

    bits = np.packbits(np.asarray(correct, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text: str, n: int):
    """The inverse of pack_correct: a bool array of shape (n,)."""
    import base64

    import numpy as np

    raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"a packed correctness vector of {n} examples needs {(n + 7) // 8} bytes, got {len(raw)}")
    return np.unpackbits(raw)[:n].astype(bool)


@dataclass(frozen=True)
class PairedDifference:
    diff: float  # mean over seeds of accuracy(model) - the same for the reference
    ci: tuple[float, float]  # CI_LEVEL percentile interval over test examples and seeds
    n_examples: int  # test examples both were scored on
    resolvable: float  # smallest |difference| this test set can resolve at the observed disagreement
    seeds: tuple[int, int]  # runs of the model, of the reference
    verdict: str  # "better", "worse" or "no resolvable difference"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"], d["seeds"] = list(self.ci), list(self.seeds)
        return d

    def words(self, reference: str, unit: str = "pp", scale: float = 100.0) -> str:
        """e.g. "better than dense by +1.23 pp (95% CI +0.41..+2.05; 10,000 test images resolve ±0.60 pp)"."""
        lo, hi = (scale * c for c in self.ci)
        tail = (f"{CI_LEVEL:.0%} CI {lo:+.2f}..{hi:+.2f} {unit} over {self.n_examples:,} test images and "
                f"{self.seeds[0]}+{self.seeds[1]} seeds; the test set resolves about ±{scale * self.resolvable:.2f} "
                f"{unit}")
        delta = f"{scale * self.diff:+.2f} {unit}"
        if self.verdict in ("better", "worse"):
            return f"{self.verdict} than {reference} by {delta} ({tail})"
        return f"no resolvable difference from {reference}: {delta} ({tail})"


def paired_bootstrap(model: Mapping[int, Sequence[bool]], reference: Mapping[int, Sequence[bool]],
                     replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """The difference of `model` to `reference`, both `{seed: per-example correctness (n,)}` on the
    same n test examples in the same order, with the bootstrap CI and verdict described above.
    Integer arithmetic throughout (counts of correct examples), so the replicates are exact."""
    import numpy as np

    if not model or not reference:
        raise ValueError("paired_bootstrap needs at least one run of the model and of the reference")
    a = np.stack([np.asarray(v, dtype=bool) for v in model.values()]).astype(np.int64)  # (S_m, n)
    b = np.stack([np.asarray(v, dtype=bool) for v in reference.values()]).astype(np.int64)  # (S_r, n)
    if a.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired_bootstrap needs correctness vectors of one length n >= 1 for every run, got "
                         f"{a.shape[1:]} and {b.shape[1:]}")
    if replicates < 100:
        raise ValueError(f"replicates must be >= 100, got {replicates}")
    n = a.shape[1]
    sa, sb = len(a), len(b)
    rng = np.random.Generator(np.random.PCG64(seed))
    # Each replicate's statistic times n * sa * sb is an integer: sb * sum(model hits) - sa * sum(ref hits).
    stats = np.empty(replicates, dtype=np.int64)
    chunk = max(1, min(replicates, 2_000_000 // n))
    for start in range(0, replicates, chunk):
        k = min(chunk, replicates - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=k)  # (k, n): how often each example is drawn
        hits_a, hits_b = counts @ a.T, counts @ b.T  # (k, S_m), (k, S_r): correct answers per run
        pick_a = rng.integers(0, sa, size=(k, sa))  # seeds drawn with replacement, per model
        pick_b = rng.integers(0, sb, size=(k, sb))
        ha = np.take_along_axis(hits_a, pick_a, 1).sum(1)
        hb = np.take_along_axis(hits_b, pick_b, 1).sum(1)
        stats[start:start + k] = sb * ha - sa * hb
    stats.sort()
    alpha = (1 - CI_LEVEL) / 2
    lo = int(stats[int(math.floor(alpha * (replicates - 1)))])
    hi = int(stats[int(math.ceil((1 - alpha) * (replicates - 1)))])
    scale = n * sa * sb
    diff = (sb * int(a.sum()) - sa * int(b.sum())) / scale
    margin = CLAIM_MARGIN_EXAMPLES * sa * sb  # CLAIM_MARGIN_EXAMPLES / n, in the integer units
    if lo >= margin:
        verdict = "better"
    elif hi <= -margin:
        verdict = "worse"
    else:
        verdict = "no resolvable difference"
    # The test set alone: a paired difference of two classifiers that disagree on a fraction d of
    # the examples has a standard error of at most sqrt(d / n); 1.96 of those is the smallest
    # difference it resolves (d: mean over all model-reference seed pairs).
    disagree = float(np.mean([(x != y).mean() for x in a for y in b]))
    resolvable = 1.96 * math.sqrt(disagree / n)
    return PairedDifference(diff, (lo / scale, hi / scale), n, resolvable, (sa, sb), verdict)


# -- the same statistics for a per-example measure (bits per character) --------------------------
# A language model is scored by a continuous loss, not a right/wrong answer. `paired_bootstrap_values`
# resamples as `paired_bootstrap` does: each replicate draws n held-out windows with replacement
# (the SAME windows for both models: paired) and, independently for each model, its seeds with
# replacement; the statistic is the mean over drawn seeds and windows of the model's per-window
# bits minus the reference's. Windows, not characters, are the resampled unit: characters inside a
# window share their context, so they are not independent draws. A difference is claimed only
# when the 95% interval excludes 0 by at least `margin` (in the measure's unit; default
# CLAIM_MARGIN_BITS, far above the ~1e-6 bits by which float rounding moves a bpc between machines).
CLAIM_MARGIN_BITS = 1e-3


@dataclass(frozen=True)
class PairedValueDifference:
    diff: float  # mean over seeds and windows of model - the same for the reference
    ci: tuple[float, float]  # CI_LEVEL percentile interval over windows and seeds
    n_examples: int  # held-out windows both were scored on
    resolvable: float  # smallest |difference| these windows resolve (1.96 SE of the mean paired difference)
    seeds: tuple[int, int]  # runs of the model, of the reference
    verdict: str  # "better", "worse" or "no resolvable difference"
    lower_is_better: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"], d["seeds"] = list(self.ci), list(self.seeds)
        return d

    def words(self, reference: str, unit: str = "bits/char", characters: int | None = None) -> str:
        """e.g. "better than gpt_micro by -0.0123 bits/char (95% CI -0.0201..-0.0050 over 181 held-out
        windows (23,168 characters) and 3+3 seeds; they resolve about ±0.0030 bits/char)"."""
        lo, hi = self.ci
        chars = f" ({characters:,} characters)" if characters is not None else ""
        tail = (f"{CI_LEVEL:.0%} CI {lo:+.4f}..{hi:+.4f} {unit} over {self.n_examples:,} held-out windows{chars} and "
                f"{self.seeds[0]}+{self.seeds[1]} seeds; they resolve about ±{self.resolvable:.4f} {unit}")
        delta = f"{self.diff:+.4f} {unit}"
        if self.verdict in ("better", "worse"):
            return f"{self.verdict} than {reference} by {delta} ({tail})"
        return f"no resolvable difference from {reference}: {delta} ({tail})"


def paired_bootstrap_values(model: Mapping[int, Sequence[float]], reference: Mapping[int, Sequence[float]],
                            lower_is_better: bool = True, margin: float = CLAIM_MARGIN_BITS,
                            replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED
                            ) -> PairedValueDifference:
    """The difference of `model` to `reference`, both `{seed: per-example values (n,)}` on the same
    n examples in the same order (e.g. bits per character of each held-out window), with the
    bootstrap CI and verdict described above (float64; a fixed generator, so every machine draws
    the same replicates)."""
    import numpy as np

    if not model or not reference:
        raise ValueError("paired_bootstrap_values needs at least one run of the model and of the reference")
    a = np.stack([np.asarray(v, dtype=np.float64) for v in model.values()])  # (S_m, n)
    b = np.stack([np.asarray(v, dtype=np.float64) for v in reference.values()])  # (S_r, n)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"paired_bootstrap_values needs value vectors of one length n >= 1 for every run, got "
                         f"{a.shape[1:]} and {b.shape[1:]}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap_values needs finite values")
    if replicates < 100:
        raise ValueError(f"replicates must be >= 100, got {replicates}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n, sa, sb = a.shape[1], len(a), len(b)
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(replicates, dtype=np.float64)
    chunk = max(1, min(replicates, 2_000_000 // n))
    for start in range(0, replicates, chunk):
        k = min(chunk, replicates - start)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=k).astype(np.float64)  # (k, n)
        sums_a, sums_b = counts @ a.T, counts @ b.T  # (k, S_m), (k, S_r): each run's total over the drawn windows
        pick_a = rng.integers(0, sa, size=(k, sa))
        pick_b = rng.integers(0, sb, size=(k, sb))
        ma = np.take_along_axis(sums_a, pick_a, 1).mean(1) / n
        mb = np.take_along_axis(sums_b, pick_b, 1).mean(1) / n
        stats[start:start + k] = ma - mb
    stats.sort()
    alpha = (1 - CI_LEVEL) / 2
    lo = float(stats[int(math.floor(alpha * (replicates - 1)))])
    hi = float(stats[int(math.ceil((1 - alpha) * (replicates - 1)))])
    diff = float(a.mean() - b.mean())
    if lo >= margin:
        verdict = "worse" if lower_is_better else "better"
    elif hi <= -margin:
        verdict = "better" if lower_is_better else "worse"
    else:
        verdict = "no resolvable difference"
    # The held-out windows alone: the paired difference of the seed-averaged models per window;
    # 1.96 standard errors of its mean is the smallest difference these windows resolve.
    per_window = a.mean(0) - b.mean(0)
    resolvable = 1.96 * float(per_window.std(ddof=1)) / math.sqrt(n) if n > 1 else float("inf")
    return PairedValueDifference(diff, (lo, hi), n, resolvable, (sa, sb), verdict, lower_is_better)
