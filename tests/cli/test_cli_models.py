"""`softmoe models`, `softmoe info` and `softmoe bench paper` (table part and the timing
machinery on a micro model)."""
import argparse
import csv
import json

import pytest

from softmoe.cli import main


def test_models_table(capsys):
    assert main(["models", "soft_moe_s1*", "--num-classes", "29593"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "params", "GFLOP/img", "img", "MoE", "layers", "experts", "type"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"soft_moe_s16", "soft_moe_s14"}
    assert rows["soft_moe_s16"][1:7] == ["933.7M", "8.55", "224", "6", "128", "SoftMoE"]  # Table 8: 933.7M, 8.6
    assert rows["soft_moe_s14"][1:6] == ["1841.4M", "13.12", "224", "6", "256"]


def test_models_all_and_no_match(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    # 84 vision models, a blank line, then the decoders' section (title, header, rule, 2 rows)
    assert len(out.splitlines()) == 2 + 84 + 1 + 3 + 2 and "vit_micro" in out and "ec_moe_h8" in out
    assert out.splitlines()[2 + 84 + 1].startswith("decoders (task lm") and "soft_moe_gpt_micro" in out
    assert main(["models", "nope*"]) == 1
    assert "no model matches 'nope*'" in capsys.readouterr().err


def test_info_shows_blocks_and_breakdown(capsys):
    assert main(["info", "soft_moe_h14", "--set", "num_experts=256", "--set", "num_classes=29593"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("soft_moe_h14: 54.18B parameters, 341.4 GFLOP/img")
    assert '  num_experts: 256' in out
    block_lines = [line for line in out.splitlines() if "dense MLP" in line or "SoftMoE(" in line]
    assert len(block_lines) == 32
    assert all("dense MLP" in line for line in block_lines[:16])
    assert all("num_experts=256" in line for line in block_lines[16:])
    assert "moe_experts" in out and "moe_dispatch_combine" in out


def test_info_json_and_errors(capsys, tmp_path):
    assert main(["info", "vit_micro", "--json"]) == 0
    prof = json.loads(capsys.readouterr().out)
    assert prof["config"]["embed_dim"] == 64 and prof["params"] == 208_202
    assert main(["info", "soft_moe_s61"]) == 2
    assert "did you mean soft_moe_s16" in capsys.readouterr().err
    assert main(["info", "vit_micro", "--set", "num_expert=3"]) == 2
    assert "did you mean 'num_experts'" in capsys.readouterr().err
    assert main(["info", "vit_micro", "--set", "depth"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2  # a directory without config.json
    assert "without config.json" in capsys.readouterr().err


def test_info_reads_a_save_pretrained_config(capsys, tmp_path):
    from softmoe.models import get_config

    cfg = get_config("soft_moe_micro", num_experts=4)
    (tmp_path / "config.json").write_text(json.dumps({"format": "softmoe", "format_version": 1, "architecture": "vit",
                                                      "config": cfg.to_dict()}))
    assert main(["info", str(tmp_path)]) == 0
    assert "num_experts=4" in capsys.readouterr().out


def test_bench_paper_tables(tmp_path, capsys):
    from softmoe.bench import paper

    parser = argparse.ArgumentParser()
    paper.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--quick", "--no-speed", "--threads", "1"])
    assert paper.run(args) == 0  # 0 = every parameter count matches the paper
    out = capsys.readouterr().out
    assert "| Soft MoE-B/16 | 128 x 6 | 3707.6M | 3707.6M | 1.0000 | 32.0 | 31.83 |" in out
    rows = list(csv.DictReader(open(tmp_path / "table8.csv")))
    assert len(rows) == 10 and all(abs(float(r["gflop_ratio"]) - 1) < 0.02 for r in rows)
    heads = list(csv.DictReader(open(tmp_path / "headlines.csv")))
    assert heads[0] == {"ratio": "GFLOP ViT-H/14 / Soft MoE-B/16", "paper": "10.4x", "ours": "10.47x"}
    assert (tmp_path / "paper.md").read_text().startswith("# Soft MoE paper, Table 8 vs softmoe")
    # softmoe._tables writes every CSV with "\n" line ends (csv.writer's default was "\r\n").
    assert all("\r" not in open(tmp_path / n, newline="").read() for n in ("table8.csv", "headlines.csv"))
    assert not list(tmp_path.glob("*.tmp"))


def test_bench_paper_composed_timing_on_micro():
    """The timing machinery on a tiny model: parts add up, and a MoE block over the weight
    budget is timed with fewer experts and the same number of slots (stated in `how`)."""
    from softmoe.bench.paper import _reduced_experts, time_composed
    from softmoe.models import get_config

    cfg = get_config("soft_moe_micro", num_classes=5)
    per_expert = 4 * (2 * 64 * 256 + 256 + 64)
    assert _reduced_experts(cfg, 8 * per_expert) == (8, 1)
    assert _reduced_experts(cfg, 3 * per_expert) == (2, 4)
    t = time_composed(cfg, "micro", batch=2, repeats=1, max_block_bytes=3 * per_expert)
    assert set(t.parts) == {"stem", "dense block", "moe block", "tail"}
    assert t.parts["dense block"][0] == 2 and t.parts["moe block"][0] == 2
    assert t.ms_per_img == pytest.approx(sum(n * ms for n, ms in t.parts.values()))
    assert "2 experts x 4 slots (same 8 slots and FLOPs as 8 x 1" in t.how


def test_bench_paper_is_a_cli_subcommand(tmp_path, capsys):
    assert main(["bench", "paper", "--no-speed", "--out", str(tmp_path)]) == 0
    assert "| ViT-H/14 | - | 668.7M | 668.7M |" in capsys.readouterr().out
    assert (tmp_path / "table8.csv").is_file() and not (tmp_path / "speed.csv").exists()


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--threads", "0"), ("--max-block-gib", "0")])
def test_bench_paper_rejects_bad_arguments(tmp_path, flag, value):
    from softmoe.bench import paper

    parser = argparse.ArgumentParser()
    paper.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), flag, value])
    with pytest.raises(ValueError, match=flag.lstrip("-").replace("-", "[-_]")):
        paper.run(args)
