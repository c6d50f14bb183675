"""The study's finding in one sentence, generated from the committed results (docs/results/),
never written by hand: what `softmoe demo` ends with.

    study_finding(results_dir) -> str

Study 1 (docs/results/cifar10/report.json, a `softmoe compare` report): Soft MoE's difference to
dense as its report words it, the budget, and how uniform its router still was. Study 2
(docs/results/cifar10_study/e10|e30/<arm>/seed<k>.json, one record per finished run): how many of
its pre-registered runs are recorded; its comparison is reported only once every run is in.
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
    parts = []
    report = root / "cifar10" / "report.json"
    if report.is_file():
        parts.append(_study1(json.loads(report.read_text())))
    for budget in ("e10", "e30"):
        folder = root / "cifar10_study" / budget
        n = len(list(folder.glob("*/seed*.json"))) if folder.is_dir() else 0
        if n:
            status = "complete" if n >= STUDY2_RUNS else "results pending"
            parts.append(f"Study 2 ({budget[1:]} epochs, pre-registered): {n} of {STUDY2_RUNS} runs recorded, "
                         f"{status}.")
    if not parts:
        return f"The CIFAR-10 studies and their findings: {POINTER} (not found beside this installation)."
    return " ".join(parts) + f" Details: {POINTER}."


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
