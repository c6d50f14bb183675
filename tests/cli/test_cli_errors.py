"""The `softmoe` dispatcher reports user errors the same way for every command."""
import pytest

import softmoe.train
from softmoe.cli import main


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["bench", "layer", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "softmoe bench: error: --threads must be >= 1, got 0\n"  # no traceback
    assert main(["demo", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "softmoe demo: error: --steps must be >= 1, got 0\n"


def test_an_error_with_an_exit_code_gets_it(monkeypatch, capsys, tmp_path):
    def diverge(*args, **kwargs):
        raise softmoe.train.TrainingDiverged("diverged at step 3")

    monkeypatch.setattr(softmoe.train, "train", diverge)
    assert main(["train", "--config", "debug", "--workdir", str(tmp_path)]) == 1
    assert capsys.readouterr().err == "softmoe train: error: diverged at step 3\n"


def test_a_bug_is_not_hidden(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(softmoe.train, "train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["train", "--config", "debug", "--workdir", str(tmp_path)])
