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


# -- --mode fsdp: training steps under EP + FSDP2 ------------------------------------------------------
def test_fsdp_byte_model_by_hand():
    """step_bytes on soft_moe_micro (D=64, E=8, P=1, H=256, 2 MoE layers, 2 router scales),
    global batch 8: the all-to-all term is the layer mode's model per MoE layer; the all-reduces,
    ring 2 (n-1)/n: loss 4 B + correct 8 B + 2 scales 8 B + the clip's dense 4 B over W=4
    (x 1.5), the experts' dp and ep norms over 2 ranks each (x 1) = 36 + 8 bytes."""
    import torch

    from softmoe.bench._fsdp_steps import step_bytes
    from softmoe.models import create_model

    with torch.device("meta"):
        model = create_model("soft_moe_micro")
    got = step_bytes(model, dp=2, ep=2, global_batch=8)
    assert got["all_to_all"] == 2 * bench.bytes_per_step("a2a", 2, E=8, M=2, D=64, itemsize=4)
    assert got["all_reduce"] == 36 + 8
    assert step_bytes(model, dp=1, ep=2, global_batch=8)["all_reduce"] == 24  # one clip norm: ep is the world
    assert step_bytes(model, dp=2, ep=1, global_batch=8)["all_to_all"] == 0
    # FSDP over W=2, no EP: the 672458 elements of every parameter but the 2 scales, gathered twice and
    # reduce-scattered once, each rank receiving the other's half; pos_embed (1, 64, 64), the only odd
    # dim 0, is padded to 2 rows (4096 elements more)
    assert sum(p.numel() for p in model.parameters() if p.dim()) == 672458
    assert [n for n, p in model.named_parameters() if p.dim() and p.shape[0] % 2] == ["pos_embed"]
    half = (672458 + 4096) // 2
    dense = step_bytes(model, dp=2, ep=1, global_batch=8)
    assert dense["all_gather"] == 2 * half * 4 and dense["reduce_scatter"] == half * 4
    assert all(v == 0 for v in step_bytes(model, 1, 1, 8).values())


@pytest.mark.cpu_only  # spawns gloo processes
def test_fsdp_mode_counts_the_model_and_steps_like_one_process(tmp_path):
    """1x1, 2x1 and 1x2 at a tiny batch: every layout in the JSON, the bytes the collectives
    received equal the byte model exactly per kind (run() also raises otherwise), positive
    times, shards smaller than the model, and the global loss after the timed steps equal
    to one process's within 1e-5 (float32 reduction order only: the benchmark times a
    correct step)."""
    out = tmp_path / "rows.json"
    args = args_for(mode="fsdp", layouts=["1x1", "2x1", "1x2"], global_batch=4, repeats=1, warmup=1,
                    out=str(tmp_path), json=str(out), timeout=150)
    assert bench.run(args) == 0
    import json

    rows = {r["layout"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["1x1", "2x1", "1x2"]
    kinds = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
    for r in rows.values():
        assert all(r[f"{k}_bytes"] == r[f"{k}_bytes_model"] for k in kinds), r
        assert r["step_ms"] > 0 and r["peak_mb"] > 0 and r["other_calls"] == 0
        assert abs(r["loss"] - rows["1x1"]["loss"]) <= 1e-5, (r["layout"], r["loss"], rows["1x1"]["loss"])
    assert all(rows["1x1"][f"{k}_bytes"] == 0 for k in kinds) and rows["1x1"]["params_per_rank"] == \
        rows["1x1"]["params_total"]
    for layout in ("2x1", "1x2"):
        r = rows[layout]
        assert r["comm_blocking_ms"] > 0 and r["comm_alone_ms"] > 0
        assert min(r["all_gather_bytes"], r["reduce_scatter_bytes"], r["all_reduce_bytes"]) > 0
        assert r["params_per_rank"] < r["params_total"] * 0.51  # half, and the padding of odd dims
    assert rows["2x1"]["all_to_all_bytes"] == 0 < rows["1x2"]["all_to_all_bytes"]
    assert "| 1x2 | 2 |" in (tmp_path / "distributed_fsdp.md").read_text()


@pytest.mark.parametrize("change, text", [({"layouts": ["2by1"]}, "DPxEP"), ({"layouts": ["1x3"]}, "must divide"),
                                          ({"global_batch": 3, "layouts": ["2x1"]}, "divisible"),
                                          ({"warmup": 0}, "--warmup must be >= 1"),
                                          ({"model": "gpt_micro"}, "Soft MoE ViT"),
                                          ({"model": "vit_micro"}, "Soft MoE ViT")])
def test_fsdp_bad_arguments(change, text):
    with pytest.raises(ValueError, match=text):
        bench.run(args_for(mode="fsdp", **change))
