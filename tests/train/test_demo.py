"""`softmoe demo` end to end with a few steps (the real run is ~2 minutes; its figures are in the report)."""
import json

from softmoe.cli import main
from softmoe.train.presets import DEMO_STEPS, demo_config


def test_demo_command_runs_both_models(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "soft_moe_micro  test accuracy" in out and "vit_micro       test accuracy" in out
    for sub in ("soft_moe", "vit"):
        assert (tmp_path / sub / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
        assert (tmp_path / sub / "plots" / "accuracy.png").is_file()
    # Running it again on the same work directory resumes the finished runs: no crash, same results.
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "3", "--threads", "1"]) == 0
    again = capsys.readouterr().out
    assert again.count("already trained") == 2
    assert "nan" not in again.lower()  # no training this session: "-", not NaN
    summary = json.loads((tmp_path / "vit" / "summary.json").read_text())  # strict JSON: no NaN
    assert summary["steps_this_session"] == 0 and summary["train_loss"] is None
    assert main(["demo", "--workdir", str(tmp_path / "x"), "--steps", "0"]) == 2


def test_demo_preset_pairs_moe_with_matching_dense_model():
    moe, dense = demo_config("soft_moe_micro"), demo_config("vit_micro")
    assert moe.steps == dense.steps == DEMO_STEPS and moe.data == dense.data == "digits"
    assert moe.model.overrides == {"patch_size": 2, "moe": {"num_experts": 16}}
    assert dense.model.overrides == {"patch_size": 2}
    assert {k: v for k, v in moe.to_dict().items() if k not in ("model", "workdir")} == \
           {k: v for k, v in dense.to_dict().items() if k not in ("model", "workdir")}
