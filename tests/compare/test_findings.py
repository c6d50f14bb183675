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
    assert f"Study 2 (10 epochs, pre-registered): 3 of {STUDY2_RUNS} runs recorded, results pending." in text
    assert "e30" not in text and "30 epochs" not in text


def test_no_results_points_to_the_docs(tmp_path):
    assert "not found beside this installation" in study_finding(tmp_path / "missing")


def test_the_committed_results_give_a_finding():
    text = study_finding()
    assert text.startswith("CIFAR-10 study 1") and "Soft MoE vs dense" in text
