"""`softmoe demo` end to end with a few steps (the real run is ~2 minutes; its figures are in the report)."""
import json

import pytest

from softmoe.cli import main
from softmoe.compare.findings import study_finding
from softmoe.train.presets import DEMO_STEPS, demo_config


@pytest.mark.cpu_only  # the demo is the CPU miniature of `softmoe compare` (device "auto")
def test_demo_command_is_a_miniature_compare(tmp_path, capsys):
    args = ["demo", "--workdir", str(tmp_path), "--steps", "3", "--seeds", "2", "--models", "dense,soft"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| soft |" in out and "Soft MoE vs dense on digits:" in out
    # The closing finding is generated from the committed docs/results (whichever study is current).
    assert study_finding() in out and "docs/results.md" in out and "CIFAR-10 study" in out
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [m["key"] for m in rep["models"]] == ["dense", "soft"] and len(rep["runs"]) == 4
    soft = next(m for m in rep["models"] if m["key"] == "soft")
    assert abs(soft["flops_vs_dense"] - 1) < 0.05  # matched FLOPs
    for r in rep["runs"]:
        assert r["workdir"].startswith(str(tmp_path))
        assert (tmp_path / "runs" / r["key"] / f"seed{r['seed']}" / "summary.json").is_file()
    # Running it again on the same folder resumes: nothing is trained, the same report.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "4 of 4 runs already complete" in again
    assert json.loads((tmp_path / "report.json").read_text())["runs"] == rep["runs"]
    assert main(["demo", "--workdir", str(tmp_path / "x"), "--steps", "0"]) == 2


def test_demo_preset_pairs_moe_with_matching_dense_model():
    moe, dense = demo_config("soft_moe_micro"), demo_config("vit_micro")
    assert moe.steps == dense.steps == DEMO_STEPS and moe.data == dense.data == "digits"
    assert moe.model.overrides == {"patch_size": 2, "moe": {"num_experts": 16}}
    assert dense.model.overrides == {"patch_size": 2}
    assert {k: v for k, v in moe.to_dict().items() if k not in ("model", "workdir")} == \
           {k: v for k, v in dense.to_dict().items() if k not in ("model", "workdir")}
