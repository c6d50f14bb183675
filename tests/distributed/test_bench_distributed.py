"""`softmoe bench distributed`: the cost model, checked against the bytes the collectives
received in a real 2-process run, and its argument errors."""
import argparse

import pytest

from softmoe.bench import distributed as bench

pytestmark = pytest.mark.distributed


def args_for(**overrides):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


def test_bytes_model():
    # a2a: 4 exchanges, each receiving (ep-1)/ep of E*M*D; gather: 2 x (ep-1) x E*M*D
    assert bench.bytes_per_step("a2a", 4, E=8, M=3, D=5, itemsize=4) == 4 * 3 * 2 * 3 * 5 * 4
    assert bench.bytes_per_step("gather", 4, E=8, M=3, D=5, itemsize=4) == 2 * 3 * 8 * 3 * 5 * 4
    assert bench.bytes_per_step("a2a", 1, E=8, M=3, D=5, itemsize=4) == 0
    with pytest.raises(ValueError, match="design must be"):
        bench.bytes_per_step("ring", 2, 8, 3, 5, 4)


def test_runs_and_counted_bytes_match_the_model(tmp_path, capsys):
    """run() raises if the bytes counted in the collectives differ from bytes_per_step."""
    args = args_for(procs=[1, 2], dim=8, tokens=4, experts=4, batch=2, repeats=1, warmup=0, out=str(tmp_path))
    assert bench.run(args) == 0
    table = (tmp_path / "distributed.md").read_text()
    assert "| 2 | gather |" in table and "| 2 | a2a |" in table
    rows = (tmp_path / "distributed.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header, 1 process, 2 processes x 2 designs


@pytest.mark.parametrize("change, text", [({"procs": [3]}, "divide --experts"), ({"dim": 0}, "--dim must be"),
                                          ({"warmup": -1}, "--warmup must be")])
def test_bad_arguments(change, text):
    with pytest.raises(ValueError, match=text):
        bench.run(args_for(**change))
