"""The study's finding in one sentence, generated from the committed results (docs/results/),
never written by hand: what `softmoe demo` ends with.

    study_finding(results_dir) -> str

Study 1 (docs/results/cifar10/report.json, a `softmoe compare` report): Soft MoE's difference to
dense as its report words it, the budget, and how uniform its router still was. Study 2
(docs/results/cifar10_study/e10|e30/<arm>/seed<k>.json, one record per finished run): how many of
its pre-registered runs are recorded while some are missing; once every run of a budget is in,
both Soft MoE arms against dense (the longest complete budget only: 30 epochs supersedes 10) on
the validation split (the pre-registered primary measure) and on the test set, with the paired
bootstrap of softmoe.compare.report (the same rule as the compare report).
"""
from __future__ import annotations

import json
from pathlib import Path

STUDY2_RUNS = 26  # pre-registered in docs/results.md: seeds 5 + 5 + 5 + 3 + 3 + 3 + 2 per budget
POINTER = "docs/results.md"


def default_results_dir() -> Path:
    """docs/results of the source tree this package runs from (absent in an installed wheel)."""
    return Path(__file__).resolve().parents[2] / "docs" / "results"


def study_finding(results_dir: str | Path | None = None) -> str:
    """One or two sentences stating what the committed results say, or where to look when there
    are none here. Reads JSON only."""
    root = Path(results_dir) if results_dir is not None else default_results_dir()
    parts, complete = [], None
    for budget in ("e10", "e30"):
        folder = root / "cifar10_study" / budget
        files = sorted(folder.glob("*/seed*.json")) if folder.is_dir() else []
        if len(files) >= STUDY2_RUNS:
            complete = (budget, files)  # the longest complete budget is the finding: it supersedes shorter ones
        elif files:
            parts.append(f"CIFAR-10 study 2 ({budget[1:]} epochs, pre-registered): {len(files)} of {STUDY2_RUNS} runs "
                         f"recorded, results pending.")
    if complete is not None:
        budget, files = complete
        parts.insert(0, _study2(budget, [json.loads(f.read_text()) for f in files]))
    report = root / "cifar10" / "report.json"
    if report.is_file() and not any("pending" not in p for p in parts):
        parts.insert(0, _study1(json.loads(report.read_text())))  # superseded once a study 2 budget is in
    if not parts:
        return f"The CIFAR-10 studies and their findings: {POINTER} (not found beside this installation)."
    return " ".join(parts) + f" Details: {POINTER}."


# The arms the one sentence reports against dense, in the pre-registration's words.
STUDY2_ARMS = (("soft", "Soft MoE (official, l2-normalised)"),
               ("soft:normalize=false", "Soft MoE without the l2 normalisation"))


def _study2(budget: str, records: list[dict]) -> str:
    from softmoe.compare.report import compare_arms

    by_key: dict[str, list[dict]] = {}
    for r in records:
        by_key.setdefault(r["key"], []).append(r)
    dense = by_key.get("dense", [])
    head = f"CIFAR-10 study 2 ({budget[1:]} epochs, all {len(records)} pre-registered runs)"
    if not dense or "val" not in dense[0].get("examples", {}):
        return f"{head}: no dense arm with a validation split recorded."
    clauses = []
    for key, name in STUDY2_ARMS:
        runs = by_key.get(key)
        if not runs:
            continue
        val, test = compare_arms(runs, dense, "val", "dense"), compare_arms(runs, dense, "test", "dense")
        clauses.append(f"{name}, {len(runs)} seeds vs {len(dense)}: {_words(val)} on validation "
                       f"({test['diff'] * 100:+.2f} pp on the test set, {_verdict(test)})")
    n_val = dense[0]["examples"]["val"]
    return f"{head}, on {n_val:,} held-out validation images: " + "; ".join(clauses) + "."


def _verdict(d: dict) -> str:
    return d["verdict"] if d["verdict"] != "no resolvable difference" else "not resolvable"


def _words(d: dict) -> str:
    lo, hi = (100 * c for c in d["ci"])
    delta = f"{100 * d['diff']:+.2f} pp, 95% CI {lo:+.2f}..{hi:+.2f}"
    if d["verdict"] in ("better", "worse"):
        return f"{d['verdict']} than dense ({delta})"
    return f"no resolvable difference ({delta})"


def _study1(report: dict) -> str:
    models = {m["key"]: m for m in report.get("models", [])}
    soft, dense = models.get("soft"), models.get("dense")
    plan = report.get("plan", {})
    budget = next((w for w in plan.get("command", "").split("--epochs ")[1:2]), "").split(" ")[0]
    where = f"CIFAR-10 study 1 ({budget} epochs, {dense['test_accuracy']['n'] if dense else '?'} seeds)"
    if soft is None or "vs_dense" not in soft:
        return f"{where}: no Soft MoE arm recorded."
    sentence = f"{where}: Soft MoE vs dense at matched FLOPs, {soft['vs_dense']['words']}"
    entropy = soft.get("routing", {}).get("dispatch_entropy")
    if entropy is not None:
        sentence += f"; its router ended near-uniform (normalised dispatch entropy {entropy:.3f})"
    return sentence + "."
