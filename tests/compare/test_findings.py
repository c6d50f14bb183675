"""The demo's closing finding is generated from the committed results (softmoe/compare/findings.py)."""
import json

from softmoe.compare.findings import STUDY2_RUNS, study_finding


def _report(tmp_path, words="no clear difference from dense: +0.78 pp (SE 0.55, 3/5 seeds agree)", entropy=0.997):
    folder = tmp_path / "cifar10"
    folder.mkdir(parents=True)
    report = {"plan": {"command": "softmoe compare --data cifar10 --epochs 3 --seeds 5"},
              "models": [{"key": "dense", "test_accuracy": {"n": 5}},
                         {"key": "soft", "vs_dense": {"words": words}, "routing": {"dispatch_entropy": entropy}}]}
    (folder / "report.json").write_text(json.dumps(report))


def test_study1_sentence_comes_from_the_report(tmp_path):
    _report(tmp_path, words="better than dense: +2.00 pp (95% CI +1.0..+3.0 pp)", entropy=0.5)
    text = study_finding(tmp_path)
    assert "study 1 (3 epochs, 5 seeds)" in text
    assert "better than dense: +2.00 pp" in text and "0.500" in text
    assert text.endswith("Details: docs/results.md.")


def test_study2_counts_recorded_runs(tmp_path):
    _report(tmp_path)
    for arm, seed in [("dense", 0), ("dense", 1), ("soft", 0)]:
        (tmp_path / "cifar10_study" / "e10" / arm).mkdir(parents=True, exist_ok=True)
        (tmp_path / "cifar10_study" / "e10" / arm / f"seed{seed}.json").write_text("{}")
    text = study_finding(tmp_path)
    assert f"study 2 (10 epochs, pre-registered): 3 of {STUDY2_RUNS} runs recorded, results pending." in text
    assert "e30" not in text and "30 epochs" not in text


def test_no_results_points_to_the_docs(tmp_path):
    assert "not found beside this installation" in study_finding(tmp_path / "missing")


def test_the_committed_results_give_a_finding():
    text = study_finding()
    assert text.startswith("CIFAR-10 study 2 (30 epochs, all 26") and "Soft MoE without the l2 normalisation" in text
    assert "10 epochs" not in text  # superseded by the longer budget


def _record(key, seed, val_hits, test_hits, n=1000):
    """A study-2 run record: the first `*_hits` of n examples right, the rest wrong."""
    from softmoe.compare.stats import pack_correct

    def vec(h):
        return pack_correct([i < h for i in range(n)])

    return {"key": key, "seed": seed, "examples": {"val": n, "test": n},
            "correct": {"val": vec(val_hits), "test": vec(test_hits)},
            "summary": {"val_accuracy": val_hits / n, "test_accuracy": test_hits / n}}


def _study2(tmp_path, budget="e10"):
    """26 records: dense and soft identical (no difference can be claimed), normalize=false
    right on 100 more validation and 2 more test images than dense in every seed."""
    arms = {"dense": (5, 400, 400), "soft": (5, 400, 400), "soft:normalize=false": (5, 500, 402),
            "soft_uniform": (3, 400, 400), "ec": (3, 400, 400), "tc1": (3, 400, 400), "soft_identity": (2, 400, 400)}
    for key, (seeds, val, test) in arms.items():
        folder = tmp_path / "cifar10_study" / budget / key.replace(":", "+")
        folder.mkdir(parents=True)
        for s in range(seeds):
            (folder / f"seed{s}.json").write_text(json.dumps(_record(key, s, val, test)))


def test_a_complete_study2_budget_reports_both_soft_arms_on_validation_and_supersedes_study1(tmp_path):
    _report(tmp_path)
    _study2(tmp_path)
    text = study_finding(tmp_path)
    assert "study 1" not in text  # superseded by the complete budget
    assert text.startswith("CIFAR-10 study 2 (10 epochs, all 26 pre-registered runs), on 1,000 held-out validation")
    soft, nonorm = text.split("; ")
    # Identical correctness: zero difference, a zero-width interval, which no margin can call a win.
    assert "official, l2-normalised), 5 seeds vs 5: no resolvable difference (+0.00 pp, 95% CI +0.00..+0.00)" in soft
    assert "+0.00 pp on the test set, not resolvable" in soft
    # +100 of 1,000 validation images in every seed: +10 pp, the bootstrap CI well clear of 0.
    assert "without the l2 normalisation, 5 seeds vs 5: better than dense (+10.00 pp" in nonorm
    # +2 test images in every seed is below the 3-examples margin: the test set does not resolve it.
    assert "+0.20 pp on the test set, not resolvable" in nonorm


def test_a_pending_budget_keeps_study1_and_counts(tmp_path):
    _report(tmp_path)
    (tmp_path / "cifar10_study" / "e30" / "dense").mkdir(parents=True)
    (tmp_path / "cifar10_study" / "e30" / "dense" / "seed0.json").write_text("{}")
    text = study_finding(tmp_path)
    assert text.startswith("CIFAR-10 study 1") and "study 2 (30 epochs, pre-registered): 1 of 26" in text


def test_the_longer_complete_budget_supersedes_the_shorter(tmp_path):
    _study2(tmp_path, "e10")
    _study2(tmp_path, "e30")
    text = study_finding(tmp_path)
    assert text.startswith("CIFAR-10 study 2 (30 epochs, all 26 pre-registered runs)") and "10 epochs" not in text
    assert text.count("CIFAR-10 study 2") == 1 and text.endswith("Details: docs/results.md.")
