"""`softmoe compare --task lm`: the paired bootstrap over per-window values, matched FLOPs checked
exactly (S = C: the experts cost the dense MLP; routing adds 8*T*D*S per MoE layer), arm errors,
and a tiny end-to-end comparison whose records make a rerun train nothing."""
import json
import math

import numpy as np
import pytest

from softmoe.cli import main
from softmoe.compare.lm import build_arms, measure_speed_lm
from softmoe.compare.stats import paired_bootstrap_values
from softmoe.models.gpt import get_decoder_config
from softmoe.models.profile import gpt_flop_breakdown


def runs(values, shift=0.0):
    return {s: (np.asarray(v) + shift).tolist() for s, v in values.items()}


def test_paired_bootstrap_values():
    rng = np.random.default_rng(0)
    base = rng.normal(2.0, 0.3, 200)  # windows differ a lot; seeds (resampled per arm) barely
    ref = {s: base + 1e-4 * s for s in range(3)}
    same = paired_bootstrap_values(runs(ref), runs(ref))
    assert same.diff == 0 and same.ci[0] < 0 < same.ci[1] and same.verdict == "no resolvable difference"
    # a constant shift: the exact difference (float64); the windows are paired, so their spread
    # cancels and the interval is the shift give or take the seed resampling
    worse = paired_bootstrap_values(runs(ref, 0.01), runs(ref))
    assert math.isclose(worse.diff, 0.01, rel_tol=1e-9) and worse.verdict == "worse"
    assert 0.0097 < worse.ci[0] <= worse.ci[1] < 0.0103 and worse.resolvable < 1e-9
    assert paired_bootstrap_values(runs(ref, -0.01), runs(ref)).verdict == "better"
    assert paired_bootstrap_values(runs(ref, 0.01), runs(ref), lower_is_better=False).verdict == "better"
    # below the claim margin (0.001 bits) nothing is claimed, however tight the interval
    assert paired_bootstrap_values(runs(ref, 0.0005), runs(ref)).verdict == "no resolvable difference"
    # seed noise the size of the shift: no claim; the held-out windows resolve ~1.96 sd / sqrt(n)
    noisy = {s: (ref[s] + rng.normal(0, 0.3, 200) + 0.01).tolist() for s in range(3)}
    d = paired_bootstrap_values(noisy, runs(ref))
    per_window = np.mean([noisy[s] for s in range(3)], 0) - np.mean([ref[s] for s in range(3)], 0)
    assert math.isclose(d.resolvable, 1.96 * per_window.std(ddof=1) / math.sqrt(200), rel_tol=1e-12)
    assert d.ci[0] < d.diff < d.ci[1]
    assert d == paired_bootstrap_values(noisy, runs(ref))  # a fixed generator: the same replicates
    assert "held-out windows (400 characters)" in d.words("gpt_micro", characters=400)
    with pytest.raises(ValueError, match="one length"):
        paired_bootstrap_values({0: [1.0, 2.0]}, {0: [1.0]})
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap_values({0: [float("nan")]}, {0: [1.0]})


def test_matched_flops_are_checked_exactly():
    arms, matching = build_arms("gpt_micro,soft_moe_gpt_micro,soft_moe_gpt_micro:rotate=false")
    dense, soft, fixed = arms
    cfg = get_decoder_config("soft_moe_gpt_micro")
    T, D, S, M = cfg.block_size, cfg.embed_dim, cfg.num_experts * cfg.slots_per_expert, cfg.mlp_dim
    fb = gpt_flop_breakdown(cfg)
    # S = C: S expert evaluations per chunk of S tokens, i.e. one per token: the dense MLP's FLOPs
    assert fb["moe_experts"] == len(cfg.moe_blocks) * 2 * T * 2 * D * M
    # routing: logits 2TDS + dispatch 2TSD + combine over 2S slots 4TSD, per MoE layer
    assert soft.flops - dense.flops == len(cfg.moe_blocks) * 8 * T * D * S == fixed.flops - dense.flops
    # FlopCounterMode on real forwards agrees up to the attention mix it does not count on the CPU
    att = gpt_flop_breakdown(get_decoder_config("gpt_micro"))["attention_mix"]
    assert dense.flops - dense.flops_counted == att and soft.flops - soft.flops_counted == att
    assert matching["ratios"]["soft_moe_gpt_micro"] == pytest.approx(1.00735, abs=1e-4)
    assert soft.params > dense.params and soft.params == fixed.params


def test_arm_errors():
    with pytest.raises(ValueError, match="must be dense"):
        build_arms("soft_moe_gpt_micro,gpt_micro")
    with pytest.raises(ValueError, match="not a decoder"):
        build_arms("gpt_micro,vit_micro")
    with pytest.raises(ValueError, match="forward FLOPs.*S = C"):  # C = 2S: the experts cost half the MLP
        build_arms("gpt_micro,soft_moe_gpt_micro:chunk_size=8")
    with pytest.raises(ValueError, match="distinct"):
        build_arms("gpt_micro,gpt_micro")
    with pytest.raises(ValueError, match="same block_size"):
        build_arms("gpt_micro,soft_moe_gpt_micro:block_size=64")
    with pytest.raises(ValueError, match="unknown GPTConfig"):
        build_arms("gpt_micro,soft_moe_gpt_micro:experts=4")


def test_speed_side_by_side():
    arms, _ = build_arms("gpt_micro,soft_moe_gpt_micro")
    out = measure_speed_lm(arms, batch_size=1, threads=1, log=lambda m: None)
    assert set(out["train_tokens_per_s"]) == {"gpt_micro", "soft_moe_gpt_micro"}
    assert all(v > 0 for v in out["train_tokens_per_s"].values())


@pytest.mark.slow
def test_tiny_comparison_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"{i} the quick brown fox jumps over the lazy dog {i * 3 % 7}\n" for i in range(300)))
    args = ["compare", "--task", "lm", "--config", "charlm", "--models", "gpt_micro,soft_moe_gpt_micro",
            "--seeds", "2", "--steps", "1", "--set", f"data={corpus}", "--set", "batch_size=2",
            "--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec"), "--jobs", "1", "--threads", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "## test (reported once)" in out and "held-out windows" in out
    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    assert sorted(p.name for p in (tmp_path / "rec" / "soft_moe_gpt_micro").glob("*.json")) == ["seed0.json",
                                                                                               "seed1.json"]
    soft = report["arms"][1]
    for split in ("val", "test"):
        s = soft[split]
        assert s["characters"] == s["windows"] * 128 and abs(s["leak_gap_bpc"]["mean"]) < 1e-4  # causal
        vs = s["vs_reference_teacher_forced"]
        assert vs["n_examples"] == s["windows"] and vs["seeds"] == [2, 2] and "words" in vs
    assert report["speed"]["train_tokens_per_s"]["gpt_micro"] > 0
    # the records make the same command train nothing, even where the work directories are gone
    import shutil

    shutil.rmtree(tmp_path / "out")
    assert main(args) == 0
    assert "4 of 4 runs already complete" in capsys.readouterr().out
    # a report of the records alone, from another --out (e.g. on another machine)
    args[args.index("--out") + 1] = str(tmp_path / "elsewhere")
    assert main([*args, "--report-only"]) == 0
    assert "report only: 4 of 4 runs complete" in capsys.readouterr().out
    assert main(["compare", "--task", "lm", "--data", "digits", "--steps", "2"]) == 2
    assert "not used by --task lm" in capsys.readouterr().err
