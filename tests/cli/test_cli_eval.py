"""`softmoe eval` / `softmoe inspect` end to end on tiny checkpoints and the embedded digits data."""
import json

import pytest
import torch

from softmoe.cli import main

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def _model(name, **kw):
    from softmoe.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **{**TINY, **kw})
    with torch.no_grad():  # the zoo's head starts at zero (all logits tie); a random one ranks classes
        model.head.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "soft"
    _model("soft_moe_micro", num_experts=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from softmoe.train.checkpoint import save_checkpoint

    wd = tmp_path_factory.mktemp("run")
    save_checkpoint(wd, 5, _model("soft_moe_micro", num_experts=4), {"step": 5},
                    {"model": "soft_moe_micro", "data": "digits", "data_root": None})
    return wd


def test_eval_json_matches_direct_computation(pretrained_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = main(["eval", "--checkpoint", str(pretrained_dir), "--data", "digits", "--fewshot", "1,5",
               "--batch-size", "50", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["fewshot"]) == {"1", "5"} and res["num_classes"] == 10
    assert "top-1" in text and "5-shot" in text
    # top-1 equals the model's accuracy computed by hand on the same data.
    from softmoe.data import load_dataset, to_model_input
    from softmoe.models import from_pretrained

    test = load_dataset("digits", "test")
    model = from_pretrained(pretrained_dir).eval()
    with torch.no_grad():
        pred = model(to_model_input(test.images, 8)).argmax(1)
    assert res["top1"] == pytest.approx(float((pred == test.labels).double().mean()), abs=1e-12)
    assert 0.0 <= res["fewshot"]["5"]["accuracy"] <= 1.0 and len(res["fewshot"]["5"]["accuracies"]) == 30


def test_eval_workdir_uses_recorded_dataset(workdir, capsys):
    assert main(["eval", "--checkpoint", str(workdir), "--fewshot", "none"]) == 0
    assert "data digits/test" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "{missing}", "--data", "digits"], "does not exist"),
    (["--checkpoint", "{ckpt}", "--data", "cifar11"], "unknown dataset 'cifar11': choose one of"),
    (["--checkpoint", "{ckpt}", "--data", "digits", "--fewshot", "1,500"], "shots=500 needs at least 500"),
    (["--checkpoint", "{ckpt}"], "--data is required"),
    (["--checkpoint", "{ckpt}", "--data", "digits", "--device", "tpu"],
     "--device must be 'auto' (or None), 'cpu', 'cuda', 'cuda:N' or a torch.device of type cpu/cuda, got 'tpu'"),
])
def test_eval_errors(argv, message, pretrained_dir, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "nope", ckpt=pretrained_dir) for a in argv]
    assert main(["eval", *argv]) == 2
    assert message in capsys.readouterr().err


def test_inspect_writes_files(workdir, tmp_path, capsys):
    out = tmp_path / "insp"
    rc = main(["inspect", "--checkpoint", str(workdir), "--images", "2", "--stats-images", "20",
               "--slots", "0,3", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "combine_weights_min_mean" in text and "top_combine_tokens" in text
    assert (out / "dispatch_blocks_1_mlp.png").stat().st_size > 1000
    report = json.loads((out / "routing.json").read_text())
    assert report["layers"][0]["plotted_slots"] == [0, 3] and report["num_stats_images"] == 20
    for name in ("layers.csv", "slots.csv", "experts.csv"):
        assert (out / name).read_text().count("\n") >= 2


def test_inspect_errors(tmp_path, pretrained_dir, capsys):
    dense = tmp_path / "dense"
    _model("vit_micro").save_pretrained(dense)
    assert main(["inspect", "--checkpoint", str(dense), "--data", "digits", "--out", str(tmp_path / "o")]) == 2
    assert "no MoE layer" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(pretrained_dir), "--data", "digits", "--slots", "0,9",
                 "--out", str(tmp_path / "o")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["inspect", "--checkpoint", str(pretrained_dir), "--data", "digits", "--device", "cuda:x",
                 "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("softmoe inspect: error: --device must be 'auto' (or None), 'cpu'")


def test_inspect_tokens_choice_reports_load(tmp_path, capsys):
    ckpt = tmp_path / "tc"
    _model("tc_moe_micro", num_experts=4).save_pretrained(ckpt)
    assert main(["inspect", "--checkpoint", str(ckpt), "--data", "digits", "--stats-images", "16",
                 "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "TokensChoiceMoE" in text and "dropped_choices_fraction" in text and "no Soft MoE layer" in text
