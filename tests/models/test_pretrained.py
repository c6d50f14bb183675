"""The trained models that ship with softmoe (softmoe/models/pretrained.py): loaded by name
offline, checked against their cards, and (where CIFAR-10 is on disk) reproducing the study
record they were trained with on the test set."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from softmoe.cli import main
from softmoe.models import from_pretrained, list_pretrained, load_model, save_pretrained
from softmoe.models import pretrained as pretrained_mod

REPO = Path(__file__).resolve().parents[2]
# docs/models.md, docs/results.md
SHIPPED = ("cifar10_vit_micro_p8", "cifar10_soft_moe_micro_p8", "cifar10_soft_moe_micro_p8_nonorm")
CIFAR10 = Path(os.environ.get("SOFTMOE_CIFAR10_ROOT", REPO.parent / "shared" / "datasets" / "cifar10"))


def test_the_documented_models_ship_and_load_by_name_as_their_cards_say():
    cards = list_pretrained()
    assert set(SHIPPED) <= set(cards)
    for name in SHIPPED:
        card = cards[name]
        model = from_pretrained(name)
        assert model.config.name == card["model"]
        assert model.config.patch_size == card["overrides"]["patch_size"] == 8
        assert (model.config.num_experts or 0) == card["overrides"].get("moe", {}).get("num_experts", 0)
        record = json.loads((REPO / card["record"]).read_text())  # the committed study record
        assert record["seed"] == card["seed"] and record["summary"]["test_accuracy"] == card["test_accuracy"]
        assert record["config"]["model"]["name"] == card["model"]
        again, train_cfg = load_model(name)  # what `softmoe eval` / `inspect` use
        assert train_cfg["data"] == "cifar10" and train_cfg["seed"] == card["seed"]
        for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert a.dtype == torch.float32 and torch.equal(a, b), k


def test_a_path_that_exists_wins_over_a_shipped_name(tmp_path, monkeypatch):
    from softmoe.models import create_model

    monkeypatch.chdir(tmp_path)
    other = create_model("vit_micro", num_classes=3)
    save_pretrained(other, tmp_path / SHIPPED[1])
    assert from_pretrained(SHIPPED[1]).config.num_classes == 3


def test_damaged_or_missing_weights_are_an_error_never_another_model(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    shutil.copytree(pretrained_mod.ROOT, root)
    monkeypatch.setattr(pretrained_mod, "ROOT", root)
    weights = root / SHIPPED[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        from_pretrained(SHIPPED[1])
    weights.unlink()
    with pytest.raises(ValueError, match="missing"):
        from_pretrained(SHIPPED[1])
    with pytest.raises(ValueError, match="no shipped model named 'nope'.*cifar10_vit_micro_p8"):
        pretrained_mod.pretrained_dir("nope")


def test_add_refuses_a_record_of_another_run(tmp_path):
    cards = list_pretrained()
    soft, dense = (pretrained_mod.ROOT / n for n in (SHIPPED[1], SHIPPED[0]))
    with pytest.raises(ValueError, match="does not describe checkpoint"):
        pretrained_mod.add("x", soft, REPO / cards[SHIPPED[0]]["record"], "mismatch", root=tmp_path)
    card = pretrained_mod.add("copy", dense, REPO / cards[SHIPPED[0]]["record"], "a copy", root=tmp_path)
    copied, _ = load_model(tmp_path / "copy")  # the card's hash is of the copy, the tensors are the shipped ones
    assert card["weights_sha256"] == pretrained_mod.sha256_file(tmp_path / "copy" / "model.safetensors")
    for (k, a), (_, b) in zip(copied.state_dict().items(), from_pretrained(SHIPPED[0]).state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="identifier"):
        pretrained_mod.add("a/b", dense, REPO / cards[SHIPPED[0]]["record"], "", root=tmp_path)


def test_models_cli_lists_the_shipped_models(capsys):
    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        card = list_pretrained()[name]
        assert name in out and f"{100 * card['test_accuracy']:.2f}" in out
    assert main(["models", "--pretrained", "nothing*"]) == 1


def test_eval_cli_takes_a_shipped_name(tmp_path, capsys):
    out = tmp_path / "eval.json"  # digits stand in for CIFAR-10 here (grey 8x8, resized): the name is what is tested
    assert main(["eval", "--checkpoint", SHIPPED[1], "--data", "digits", "--fewshot", "none", "--device", "cpu",
                 "--json", str(out)]) == 0
    assert f"checkpoint {SHIPPED[1]}: model soft_moe_micro" in capsys.readouterr().out
    assert json.loads(out.read_text())["num_test"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR10 / "test").is_dir(), reason=f"CIFAR-10 is not at {CIFAR10} (SOFTMOE_CIFAR10_ROOT)")
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_study_record_on_the_test_set(name):
    """The shipped model's predictions on the 10,000 CIFAR-10 test images are the study record's
    (its packed per-example correctness, docs/results/) and its accuracy the card's: exactly on
    the machine type that trained it; at most 10 images (0.1 pp) may flip elsewhere, where float
    rounding can move a near-tie between two classes."""
    from softmoe.compare.runner import per_example_correct
    from softmoe.compare.stats import unpack_correct
    from softmoe.data import load_dataset
    from softmoe.eval.loading import make_prepare

    card = list_pretrained()[name]
    model, _ = load_model(name)
    test = load_dataset("cifar10", "test", str(CIFAR10))
    got = per_example_correct(model.eval(), test, make_prepare(model, test.channels), 256)
    assert len(got) == card["num_test"] == 10000
    assert abs(got.mean() - card["test_accuracy"]) <= 10 / 10000
    record = json.loads((REPO / card["record"]).read_text())
    assert (got != unpack_correct(record["correct"]["test"], 10000)).sum() <= 10
