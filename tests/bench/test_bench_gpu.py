"""`softmoe bench gpu`: the whole command end to end on tiny shapes (--smoke, on the test device),
its correctness part's verdicts, and its user errors."""
import json
from pathlib import Path

import pytest
import torch

from softmoe.bench.gpu import command, correctness, resume


def test_smoke_writes_json_and_markdown(tmp_path, monkeypatch, device):
    """Every part runs and lands in gpu.json / gpu.md; the resume part is faked here (it is two
    `softmoe train` processes: test_kill_and_resume below)."""
    monkeypatch.setattr(resume, "kill_and_resume", lambda workdir, dev, steps, every: {"ok": True, "steps": steps})
    n = torch.get_num_threads()
    try:
        rc = command.main(["--smoke", "--device", str(device), "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert rc == 0 and report["ok"] and report["smoke"]
    parts = report["parts"]
    assert [r["dtype"] for r in parts["correctness"]["result"]][:4] == ["fp32", "fp32", "bf16", "bf16"]
    layer = parts["layer"]["result"]
    assert {(r["dtype"], r["implementation"]) for r in layer} >= {("fp32", "softmoe"), ("bf16", "softmoe")}
    assert all(r["fwdbwd_ms"] > 0 for r in layer)
    assert [r["model"] for r in parts["training"]["result"]] == ["soft_moe_micro", "vit_micro"]
    assert all(r["img_per_s"] > 0 for r in parts["training"]["result"])
    md = (tmp_path / "gpu.md").read_text()
    assert "## correctness" in md and "## layer" in md and "PASS" in md


def test_correctness_rows_can_fail(device):
    """The tolerances are tight enough to catch a wrong path: a perturbed weight in the fp32
    layer under test (not in the float64 reference) fails the fp32 row."""
    rows = correctness.check(device, ["fp32"], dim=8, experts=2, hidden=16, batch=2, tokens=5)
    assert all(r["ok"] and r["fwd_rel_err"] < 1e-5 for r in rows)  # fp32 vs float64: ~1e-7 here
    original = correctness._run

    def perturbed(layer, x, dy, dtype):
        if layer.experts.w1.dtype == torch.float32:
            with torch.no_grad():
                layer.experts.w1.mul_(1.001)
        return original(layer, x, dy, dtype)

    correctness._run = perturbed
    try:
        rows = correctness.check(device, ["fp32"], dim=8, experts=2, hidden=16, batch=2, tokens=5)
    finally:
        correctness._run = original
    assert not any(r["ok"] for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    from softmoe.cli import main

    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--device='cuda' but CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_cpu_without_smoke_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        command.main(["--device", "cpu", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--budget-s"):
        command.main(["--smoke", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.cpu_only
def test_kill_and_resume(tmp_path):
    """A real `softmoe train` killed after its first checkpoint, resumed to the end."""
    out = resume.kill_and_resume(Path(tmp_path) / "w", "cpu", steps=20, every=10, timeout_s=300)
    assert out["ok"] and out["killed"] and out["resumed_from"] == 10 and out["steps"] == 20
