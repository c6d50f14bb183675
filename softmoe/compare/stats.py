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
