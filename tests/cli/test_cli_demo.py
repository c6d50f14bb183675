"""`softmoe demo` end to end at a toy length: the cost and results tables, the routing panel, the verdict
with the test set's resolution, and the study's generated finding."""
import pytest

from softmoe.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--steps", "4", "--seeds", "1"]) == 0
    out = capsys.readouterr().out
    assert "## Results" in out and "FLOPs vs dense" in out  # its cost beside dense's
    assert "## Routing diagnostics" in out and "## Routing over training" in out  # what its router did
    assert "Soft MoE vs dense on digits:" in out and "the test set resolves about" in out
    assert "Details: docs/results.md." in out  # the finding generated from docs/results/
    assert (tmp_path / "demo" / "report.md").is_file()
