"""softmoe compare: the statistics against hand-computed values, the matched-FLOPs family,
resuming, an end-to-end run on digits and bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from softmoe.compare import build_family, compare, difference, parse_models, parse_seeds, sparse_group_size, summarize
from softmoe.compare.family import MODELS
from softmoe.models.profile import profile_model

# -- statistics ---------------------------------------------------------------------------


def test_summarize_matches_hand_computation():
    s = summarize([0.5, 0.6, 0.7])
    assert s.n == 3 and s.mean == pytest.approx(0.6, abs=1e-15)
    assert s.std == pytest.approx(0.1, abs=1e-15)  # sqrt(((-.1)^2 + 0 + .1^2) / 2)
    one = summarize([0.42])
    assert one.std is None and one.mean == 0.42
    with pytest.raises(ValueError, match="at least one"):
        summarize([])
    with pytest.raises(ValueError, match="finite"):
        summarize([0.1, float("nan")])


def test_difference_standard_error_and_verdict():
    dense = {0: 0.50, 1: 0.52, 2: 0.54}  # mean .52, std .02
    model = {0: 0.60, 1: 0.61, 2: 0.62}  # mean .61, std .01
    d = difference(model, dense)
    assert d.diff == pytest.approx(0.09, abs=1e-12)
    assert d.se == pytest.approx(math.sqrt(0.02**2 / 3 + 0.01**2 / 3), abs=1e-12)  # 0.012910
    assert d.paired_signs == (1, 1, 1) and d.verdict == "better"
    assert "better than dense by +9.00 pp" in d.words("dense") and "3/3 seeds agree" in d.words("dense")
    worse = difference(dense, model)
    assert worse.verdict == "worse" and worse.diff == pytest.approx(-0.09, abs=1e-12)


def test_verdict_needs_two_standard_errors():
    dense = {0: 0.50, 1: 0.52, 2: 0.54}  # SE of the difference: sqrt(2 * .02^2 / 3) = 0.01633
    just_below = {s: v + 0.0326 for s, v in dense.items()}  # 1.996 SE
    just_above = {s: v + 0.0328 for s, v in dense.items()}  # 2.008 SE
    assert difference(just_below, dense).verdict == "no clear difference"
    assert difference(just_above, dense).verdict == "better"


def test_verdict_needs_every_seed_to_agree():
    model = {0: 0.60, 1: 0.61, 2: 0.62, 3: 0.49}  # mean +0.08 but seed 3 points the other way
    dense = {0: 0.500, 1: 0.501, 2: 0.499, 3: 0.500}
    d = difference(model, dense)
    assert abs(d.diff) > 2 * d.se  # large enough on its own ...
    assert d.paired_signs == (1, 1, 1, -1) and d.verdict == "no clear difference"  # ... but not on every seed


def test_too_few_runs_makes_no_claim():
    d = difference({0: 0.9}, {0: 0.1, 1: 0.2})
    assert d.se is None and d.verdict == "too few runs"
    assert "too few runs" in d.words("dense")


def test_lower_is_better_flips_the_verdict():
    d = difference({0: 1.0, 1: 1.01, 2: 1.02}, {0: 2.0, 1: 2.01, 2: 2.02}, higher_is_better=False)
    assert d.verdict == "better"


# -- the family ---------------------------------------------------------------------------


@pytest.mark.parametrize("base, backbone", [
    ("micro", {"img_size": 32, "num_classes": 10}),
    ("micro", {"img_size": 32, "num_classes": 10, "patch_size": 8}),
    ("micro", {"img_size": 8, "num_classes": 10, "in_chans": 1, "patch_size": 2}),
    ("vit_ti16", {}), ("vit_s16", {}), ("vit_s32", {}), ("vit_b16", {}),
])
def test_soft_moe_flops_match_dense_within_tolerance(base, backbone):
    specs, info = build_family(base, ("dense", "soft", "soft_1expert", "soft_identity", "ec"), backbone,
                               tolerance=0.05)
    by = {s.key: s for s in specs}
    dense = profile_model(by["dense"].model, **by["dense"].overrides)
    soft = profile_model(by["soft"].model, **by["soft"].overrides)  # recounted independently of the spec
    assert abs(soft.flops / dense.flops - 1) <= 0.05
    assert by["soft"].flops == soft.flops and by["dense"].flops == dense.flops
    assert info["experts"] % 4 == 0 and soft.num_experts == info["experts"]
    # the one-expert control has the same slot count, so the same FLOPs, and ~dense parameters
    assert by["soft_1expert"].flops == pytest.approx(soft.flops, rel=1e-12)
    assert by["soft_1expert"].params < 1.1 * dense.params
    # identity routing: one slot per token, no router
    assert by["soft_identity"].overrides["moe"]["num_experts"] == info["tokens"]


def test_matching_picks_the_closest_expert_count():
    backbone = {"img_size": 32, "num_classes": 10}
    _, info = build_family("micro", ("dense", "soft"), backbone)
    e = info["experts"]
    f0 = profile_model("vit_micro", **backbone).flops
    err = {k: abs(profile_model("soft_moe_micro", num_experts=k, **backbone).flops / f0 - 1) for k in (e - 4, e, e + 4)}
    assert err[e] <= err[e - 4] and err[e] <= err[e + 4]


def test_dense_wide_has_the_soft_moe_parameter_count():
    specs, _ = build_family("micro", ("dense", "soft", "dense_wide"), {"img_size": 32, "num_classes": 10})
    by = {s.key: s for s in specs}
    per_unit = (profile_model("vit_micro", img_size=32, mlp_dim=257).params
                - profile_model("vit_micro", img_size=32).params)
    assert abs(by["dense_wide"].params - by["soft"].params) <= per_unit / 2 + 1


def test_tight_tolerance_is_a_clear_error():
    with pytest.raises(ValueError, match="flops-tolerance"):
        build_family("micro", ("dense", "soft"), {"img_size": 32}, tolerance=1e-6)


def test_sparse_group_size_divides_every_batch():
    assert sparse_group_size([128, 512, 272]) == 8
    assert sparse_group_size([64, 512, 359]) == 1
    assert sparse_group_size([12, 512, 0]) == 4


# -- bad input ----------------------------------------------------------------------------


def test_bad_names_and_seeds_are_clear_errors():
    with pytest.raises(ValueError, match="--models: unknown model name.*'softt'"):
        parse_models("dense,softt")
    assert parse_models("soft") == ("dense", "soft")  # dense is always the reference
    assert parse_models("all") == MODELS
    for bad in ("", "0", "-1", "a,b", "1,1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7]
    with pytest.raises(ValueError, match="--base"):
        build_family("soft_moe_micro", ("dense",))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([sys.executable, "-m", "softmoe", "compare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, needle", [
    (["--data", "digits", "--steps", "2", "--models", "dense,nope"], "--models: unknown model name"),
    (["--data", "digits", "--steps", "2", "--seeds", ""], "--seeds"),
    (["--data", "no_such_dataset", "--steps", "2"], "unknown dataset 'no_such_dataset'"),
    (["--data", "digits"], "--epochs or --steps"),
    (["--data", "digits", "--steps", "2", "--set", "seed=3"], "--set seed=... is chosen by compare"),
    (["--data", "digits", "--steps", "2", "--backbone", "patch_size"], "--backbone expects KEY=VALUE"),
])
def test_cli_bad_input_exits_2_with_the_argument_named(tmp_path, args, needle):
    r = _cli(*args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "runs").exists()  # nothing was trained


# -- end to end ---------------------------------------------------------------------------

ARGS = dict(models="dense,soft,tc1", seeds="0,1", steps=3, backbone={"patch_size": 2},
            overrides=["batch_size=32", "augment=none", "log_every=1"], jobs=2)


@pytest.mark.slow
def test_end_to_end_on_digits_then_resume(tmp_path):
    lines: list[str] = []
    rep = compare("digits", tmp_path, log=lines.append, **ARGS)
    for f in ("report.md", "report.json", "plan.json", "accuracy_vs_flops.png", "accuracy_vs_wallclock.png",
              "learning_curves.png"):
        assert (tmp_path / f).is_file(), f
    assert [m["key"] for m in rep["models"]] == ["dense", "soft", "tc1"]
    assert len(rep["runs"]) == 6 and all(0 <= r["test_accuracy"] <= 1 for r in rep["runs"])
    soft = next(m for m in rep["models"] if m["key"] == "soft")
    assert soft["vs_dense"]["verdict"] in ("better", "worse", "no resolvable difference")
    assert soft["vs_dense"]["method"] == "paired_bootstrap" and soft["vs_dense"]["n_examples"] == 359
    assert 0 < soft["routing"]["dispatch_entropy"] <= 1 and "dropped_tokens" in rep["models"][2]["routing"]
    md = (tmp_path / "report.md").read_text()
    assert "| dense |" in md and "Δ vs dense" in md and "## Every run" in md
    # the report's numbers are the runs' own
    rec = json.loads((tmp_path / "runs" / "soft" / "seed1" / "compare_run.json").read_text())
    assert rec["summary"]["test_accuracy"] in [r["test_accuracy"] for r in rep["runs"]]
    # the saved per-example correctness is the trainer's own final evaluation, image by image
    from softmoe.compare.stats import unpack_correct

    assert unpack_correct(rec["correct"]["test"], 359).mean() == rec["summary"]["test_accuracy"]

    # A "killed" comparison: one run lost its record (it never finished), one never started.
    os.unlink(tmp_path / "runs" / "soft" / "seed1" / "compare_run.json")
    import shutil

    shutil.rmtree(tmp_path / "runs" / "tc1" / "seed0")
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("runs/*/seed*/compare_run.json")}
    lines.clear()
    rep2 = compare("digits", tmp_path, log=lines.append, **ARGS)
    assert any("4 of 6 runs already complete; running the other 2" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # complete runs untouched
    assert len(rep2["runs"]) == 6
    # the re-run soft seed 1 resumed its finished work directory: same accuracy as before
    again = json.loads((tmp_path / "runs" / "soft" / "seed1" / "compare_run.json").read_text())
    assert again["summary"]["test_accuracy"] == rec["summary"]["test_accuracy"]


@pytest.mark.slow
def test_another_plan_is_refused_but_more_seeds_extend_it(tmp_path):
    one = {**ARGS, "models": "dense", "seeds": "1", "jobs": 1}
    compare("digits", tmp_path, log=lambda m: None, **one)
    with pytest.raises(ValueError, match="holds another comparison.*steps"):
        compare("digits", tmp_path, log=lambda m: None, **{**one, "steps": 4})
    lines: list[str] = []
    rep = compare("digits", tmp_path, log=lines.append, **{**one, "seeds": "2"})
    assert any("1 of 2 runs already complete; running the other 1" in line for line in lines)
    assert sorted(r["seed"] for r in rep["runs"]) == [0, 1]
    assert json.loads((tmp_path / "plan.json").read_text())["seeds"] == [0, 1]


@pytest.mark.slow
def test_val_split_is_reported_beside_test(tmp_path):
    rep = compare("digits", tmp_path, log=lambda m: None, **{**ARGS, "models": "dense,soft", "seeds": "2",
                                                            "overrides": ARGS["overrides"] + ["val_split=0.1"]})
    from softmoe.compare.stats import unpack_correct

    soft = next(m for m in rep["models"] if m["key"] == "soft")
    assert rep["ranking_by"] == "val_accuracy" and "vs_dense_val" in soft and "vs_dense" in soft
    rec = json.loads((tmp_path / "runs" / "soft" / "seed0" / "compare_run.json").read_text())
    n_val = rec["examples"]["val"]
    assert n_val == 143 and unpack_correct(rec["correct"]["val"], n_val).mean() == rec["summary"]["val_accuracy"]
    md = (tmp_path / "report.md").read_text()
    assert "val Δ vs dense" in md and "On the validation split" in md


def test_an_arm_carries_layer_options():
    from softmoe.compare.family import arm_dirname, split_arm

    assert split_arm("soft:normalize=false:noise_std=0.5") == ("soft", {"normalize": False, "noise_std": 0.5})
    keys = parse_models("soft,soft:normalize=false")
    assert keys == ("dense", "soft", "soft:normalize=false")
    backbone = {"img_size": 8, "in_chans": 1, "num_classes": 10, "patch_size": 2}
    specs, _ = build_family("micro", keys, backbone, experts=16)
    soft, plain = specs[2], specs[1]
    assert soft.overrides["moe"] == {**plain.overrides["moe"], "normalize": False}
    assert soft.flops == plain.flops and "normalize=False" in soft.description
    assert arm_dirname(soft.key) == "soft+normalize=false"
    with pytest.raises(ValueError, match="unknown model name"):
        parse_models("softer:normalize=false")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_models("soft:normalize")
    with pytest.raises(ValueError, match="arm 'soft:no_such_field=1'"):
        build_family("micro", parse_models("soft:no_such_field=1"), backbone, experts=16)


def test_arm_seeds_split_at_the_last_equals_and_must_name_listed_arms(tmp_path):
    from softmoe.cli.compare import _arm_seeds

    assert _arm_seeds(["soft:normalize=false=5", "soft_identity=0,1"]) == {"soft:normalize=false": "5",
                                                                          "soft_identity": "0,1"}
    with pytest.raises(ValueError, match="ARM=SEEDS"):
        _arm_seeds(["soft="])
    with pytest.raises(ValueError, match="--arm-seeds names arm"):
        compare("digits", tmp_path, models="dense,soft", arm_seeds={"ec": "2"}, steps=1, log=lambda m: None)


@pytest.mark.slow
def test_records_dir_resumes_on_a_new_machine(tmp_path):
    args = {**ARGS, "models": "dense,soft:normalize=false", "seeds": "1", "jobs": 1,
            "overrides": ARGS["overrides"] + ["eval_every=1"]}
    rep = compare("digits", tmp_path / "a", records_dir=tmp_path / "rec", log=lambda m: None, **args)
    assert (tmp_path / "rec" / "soft+normalize=false" / "seed0.json").is_file()
    soft = rep["models"][1]
    assert [h["step"] for h in soft["router_over_time"]] == [1, 2, 3] and "scale" in soft["router_over_time"][0]
    import shutil

    shutil.rmtree(tmp_path / "a")  # a new machine: only the committed records are left
    lines: list[str] = []
    rep2 = compare("digits", tmp_path / "a", records_dir=tmp_path / "rec", log=lines.append, **args)
    assert any("2 of 2 runs already complete" in line for line in lines)
    assert rep2["models"][1]["vs_dense"] == soft["vs_dense"]
    assert not (tmp_path / "a" / "runs").exists()  # nothing was trained again
    # The records serve any --out: a run's work directory is not part of what it trained.
    lines = []
    rep3 = compare("digits", tmp_path / "elsewhere", records_dir=tmp_path / "rec", log=lines.append, **args)
    assert any("2 of 2 runs already complete" in line for line in lines), lines
    assert rep3["models"][1]["vs_dense"] == soft["vs_dense"] and not (tmp_path / "elsewhere" / "runs").exists()
    # ...but a record of another config is not reused.
    from softmoe.compare.runner import Run, completed

    rec_path = tmp_path / "rec" / "dense" / "seed0.json"
    cfg = json.loads(rec_path.read_text())["config"]
    assert completed(Run("dense", 0, str(tmp_path / "new"), {**cfg, "workdir": "x"}, str(rec_path))) is not None
    assert completed(Run("dense", 0, str(tmp_path / "new"), {**cfg, "lr": cfg["lr"] * 2}, str(rec_path))) is None


def test_a_run_another_command_completed_meanwhile_is_returned_untouched(tmp_path, monkeypatch):
    """Two commands sharing --records: when a planned run's record appears before it starts, the
    run is neither trained nor re-evaluated, and its record (with the training figures that a
    re-evaluation of the final checkpoint would blank) stays byte for byte as it was."""
    from softmoe.compare import runner

    cfg = {"model": "vit_micro", "seed": 0, "lr": 1e-3, "workdir": str(tmp_path / "w")}
    rec_path = tmp_path / "rec" / "dense" / "seed0.json"
    run = runner.Run("dense", 0, str(tmp_path / "w"), cfg, str(rec_path))
    monkeypatch.setattr(runner, "train_run", lambda r: pytest.fail("trained a completed run"))
    rec_path.parent.mkdir(parents=True)
    theirs = {"key": "dense", "seed": 0, "config": {**cfg, "workdir": "elsewhere"}, "run_s": 1106.3,
              "summary": {"train_loss": 1.11, "test_accuracy": 0.64}}
    rec_path.write_text(json.dumps(theirs))
    before = rec_path.read_bytes()
    assert runner.execute(run) == theirs
    assert rec_path.read_bytes() == before and not (tmp_path / "w").exists()
    # a record of another config does not count: that run is trained
    rec_path.write_text(json.dumps({**theirs, "config": {**cfg, "lr": 2e-3}}))
    with pytest.raises(pytest.fail.Exception, match="trained a completed run"):
        runner.execute(run)
