"""Few-shot linear evaluation on frozen features (docs/design.md §5; big_vision/vmoe `fewshot.py`).

Protocol: take `shots` random train images per class; standardise the features with the
few-shot set's mean and (population) std + 1e-5; append a constant bias feature of 100 (so
the bias is almost unregularised); targets `2*onehot - 1`; closed-form ridge regression for
each L2 strength in `2**i, i in [-10, 20)`; predict argmax on the test split; report the best
test accuracy over the grid.

Why one eigendecomposition: with X the (N, K) standardised few-shot features (K = D + 1
with the bias column) and Y the (N, C) targets, the ridge weights are

    (A) N >= K:  W = (X^T X + l I)^-1 X^T Y     (K x K system)
    (B) N <  K:  W = X^T (X X^T + l I)^-1 Y     (N x N kernel system)

(equal by the push-through identity). Write the Gram matrix G (X^T X or X X^T) as
Q diag(e) Q^T once; then for every l, W = lhs diag(1 / (e + l)) rhs with lhs = Q, rhs =
Q^T X^T Y in (A) and lhs = X^T Q, rhs = Q^T Y in (B). The 30 strengths then cost 30 small
matmuls instead of 30 solves. All of it runs in float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence

import torch

BIAS_FEATURE = 100.0
STD_EPS = 1e-5
DEFAULT_SHOTS = (1, 5, 10, 25)


def default_l2_regs() -> list[float]:
    """The design grid (docs/design.md §5): 2**i for i in [-10, 20), 30 values, increasing."""
    return [2.0**i for i in range(-10, 20)]


def parse_shots(text: str | Sequence[int]) -> list[int]:
    """'1,5,10,25' -> [1, 5, 10, 25] (sorted, unique, each >= 1); '' or 'none' -> []."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) == 1 and parts[0].lower() in ("none", "0", "off"):
            return []
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"fewshot must be a comma-separated list of integers >= 1 such as '1,5,10,25', "
                             f"got {text!r}") from None
    else:
        values = list(text)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"fewshot shots must be integers >= 1, got {v!r}")
    return sorted(set(values))


def _class_name(classes: Sequence[str] | None, c: int) -> str:
    return f"{c} ({classes[c]!r})" if classes is not None and c < len(classes) else str(c)


def select_fewshot(labels: torch.Tensor, shots: int, num_classes: int | None = None, seed: int = 0,
                   classes: Sequence[str] | None = None) -> torch.Tensor:
    """Indices (num_classes, shots) of `shots` random examples of each class.

    The choice depends only on (labels, seed), and row c's first s entries are the s-shot
    choice for every s <= shots, so the 1-, 5-, 10- and 25-shot sets are nested and one
    feature pass over the largest set serves all of them.

    Raises ValueError naming the class and its count when a class has fewer than `shots`
    examples.
    """
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)  # (N,)
    if labels.numel() == 0:
        raise ValueError("labels is empty: the train split has no examples for few-shot selection")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    if int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got min {int(labels.min())}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be < num_classes={num_classes}, got max {int(labels.max())}")
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    short = torch.nonzero(counts < shots).flatten().tolist()
    if short:
        short.sort(key=lambda c: (int(counts[c]), c))  # the smallest classes first
        listed = ", ".join(f"class {_class_name(classes, c)} has {int(counts[c])}" for c in short[:5])
        more = f" (and {len(short) - 5} more classes)" if len(short) > 5 else ""
        raise ValueError(f"fewshot shots={shots} needs at least {shots} train images per class, but the smallest "
                         f"class has {int(counts.min())}: {listed}{more}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(labels.numel(), generator=gen)  # (N,) one random order for all classes
    order = perm[torch.argsort(labels[perm], stable=True)]  # grouped by class, random within a class
    starts = torch.cumsum(counts, 0) - counts  # (C,) first position of each class in `order`
    pos = starts.unsqueeze(1) + torch.arange(shots).unsqueeze(0)  # (C, shots)
    return order[pos]


def _standardise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(M, D) -> (M, D+1): standardised features plus the constant bias column."""
    z = (x - mean) / std
    return torch.cat([z, z.new_full((z.shape[0], 1), BIAS_FEATURE)], dim=1)


@dataclass
class RidgeProbe:
    """Pre-computed eigen-solution of the few-shot ridge problem (see module docstring)."""
    mean: torch.Tensor  # (1, D)
    std: torch.Tensor  # (1, D)
    eigs: torch.Tensor  # (K',)  K' = min(N, D+1)
    lhs: torch.Tensor  # (D+1, K')
    rhs: torch.Tensor  # (K', C)
    kernel: bool = field(default=False)  # True when the N x N system was used

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> RidgeProbe:
        """x (N, D) features, y (N,) int labels in [0, num_classes)."""
        if x.dim() != 2 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"few-shot features must be (N, D) with labels (N,), N >= 1; got features "
                             f"{tuple(x.shape)} and labels {tuple(y.shape)}")
        x = x.to(torch.float64)
        mean = x.mean(0, keepdim=True)
        std = x.std(0, unbiased=False, keepdim=True) + STD_EPS
        xs = _standardise(x, mean, std)  # (N, K)
        targets = 2.0 * torch.nn.functional.one_hot(y.long().to(x.device), num_classes).to(torch.float64) - 1.0
        n, k = xs.shape
        kernel = n < k
        if kernel:
            eigs, q = torch.linalg.eigh(xs @ xs.T)  # (N,), (N, N)
            lhs, rhs = xs.T @ q, q.T @ targets
        else:
            eigs, q = torch.linalg.eigh(xs.T @ xs)  # (K,), (K, K)
            lhs, rhs = q, q.T @ (xs.T @ targets)
        return cls(mean=mean, std=std, eigs=eigs, lhs=lhs, rhs=rhs, kernel=kernel)

    def weights(self, l2: float) -> torch.Tensor:
        """Ridge weights (D+1, C) for one L2 strength (the last row multiplies the bias 100)."""
        return (self.lhs / (self.eigs + l2).unsqueeze(0)) @ self.rhs

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Test features (M, D) -> (M, K') standardised and multiplied by lhs, so that the
        logits for strength l are project(x) diag(1/(eigs+l)) rhs."""
        return _standardise(x.to(torch.float64).to(self.lhs.device), self.mean, self.std) @ self.lhs


def fewshot_ridge(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  num_classes: int, l2_regs: Sequence[float] | None = None) -> dict:
    """Fit the few-shot probe on (train_x (N, D), train_y (N,)), evaluate on (test_x (M, D),
    test_y (M,)) for every L2 strength. Returns {"accuracy": best, "l2": its strength (the
    smallest one on ties), "accuracies": [one per strength], "l2_regs": [...]}."""
    l2_regs = default_l2_regs() if l2_regs is None else [float(lam) for lam in l2_regs]
    if not l2_regs or any(not lam > 0 for lam in l2_regs):
        raise ValueError(f"l2_regs must be a non-empty list of numbers > 0, got {l2_regs!r}")
    if test_x.dim() != 2 or test_x.shape[1] != train_x.shape[1] or test_y.shape != (test_x.shape[0],):
        raise ValueError(f"test features must be (M, {train_x.shape[1]}) with labels (M,); got "
                         f"{tuple(test_x.shape)} and {tuple(test_y.shape)}")
    if test_x.shape[0] == 0:
        raise ValueError("the test split is empty")
    probe = RidgeProbe.fit(train_x, train_y, num_classes)
    L, C = len(l2_regs), num_classes
    # Every strength at once: logits_l = project(x) @ (diag(1/(eigs+l)) rhs), so one
    # (m, K') x (K', L*C) matmul per chunk of test rows; chunks bound the (m, L, C) logits
    # to about 2**25 float64 numbers (256 MiB).
    l2 = torch.tensor(l2_regs, dtype=torch.float64, device=probe.eigs.device)
    w_all = (probe.rhs.unsqueeze(0) / (probe.eigs.unsqueeze(0) + l2.unsqueeze(1)).unsqueeze(2))  # (L, K', C)
    w_all = w_all.permute(1, 0, 2).reshape(-1, L * C)  # (K', L*C)
    correct = torch.zeros(L, dtype=torch.int64, device=w_all.device)
    target = test_y.long().to(w_all.device)
    chunk = max(1, 2**25 // (L * C))
    for start in range(0, test_x.shape[0], chunk):
        t = probe.project(test_x[start:start + chunk])  # (m, K')
        pred = (t @ w_all).view(-1, L, C).argmax(2)  # (m, L)
        correct += (pred == target[start:start + chunk].unsqueeze(1)).sum(0)
    accs = (correct.double() / test_x.shape[0]).tolist()
    best = max(range(len(accs)), key=lambda i: (accs[i], -i))
    return {"accuracy": accs[best], "l2": l2_regs[best], "accuracies": accs, "l2_regs": l2_regs,
            "system": "kernel (N x N)" if probe.kernel else "primal (D x D)"}


def fewshot_evaluate(features: torch.Tensor, test_features: torch.Tensor, test_labels: torch.Tensor,
                     shots_list: Sequence[int], l2_regs: Sequence[float] | None = None) -> dict[int, dict]:
    """Run `fewshot_ridge` for each shot count on nested few-shot sets.

    features (C, max_shots, D): the features of the images picked by `select_fewshot`, row c
    holding class c (so the s-shot set is features[:, :s]). test_features (M, D), test_labels
    (M,). Returns {shots: result dict (see `fewshot_ridge`) plus "num_train"}."""
    if features.dim() != 3:
        raise ValueError(f"features must be (num_classes, max_shots, dim), got shape {tuple(features.shape)}")
    num_classes, max_shots, dim = features.shape
    out = {}
    for s in shots_list:
        if not 1 <= s <= max_shots:
            raise ValueError(f"shots={s} must be in [1, {max_shots}] (the examples selected per class)")
        x = features[:, :s].reshape(num_classes * s, dim)
        y = torch.arange(num_classes, device=features.device).repeat_interleave(s)
        res = fewshot_ridge(x, y, test_features, test_labels, num_classes, l2_regs)
        res["num_train"] = num_classes * s
        out[s] = res
    return out
