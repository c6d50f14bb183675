"""`softmoe export` on a DCP checkpoint directory (dcp/ + config.json, as a parallel run writes
it; here saved by one process: DCP's format does not depend on the writer count, and
tests/train/test_distributed_train.py exports a 4-rank run's), and its error contract."""
import pytest
import torch

from softmoe.cli import main

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory):
    from softmoe import distributed as smd
    from softmoe.models import create_model
    from softmoe.models.hub import DCP_DIR, save_config

    torch.manual_seed(0)
    model = create_model("soft_moe_micro", **TINY, num_experts=4)
    with torch.no_grad():
        for p in model.parameters():  # every tensor distinct from its init (router.scale included)
            p.add_(torch.randn_like(p))
    ckpt = tmp_path_factory.mktemp("run") / "checkpoints" / "step_00000003"
    ckpt.mkdir(parents=True)
    smd.save_checkpoint(ckpt / DCP_DIR, model, torch.optim.AdamW(model.parameters()), extra={"step": 3})
    save_config(model.config, ckpt)
    torch.save({"step": 3}, ckpt / "train_state.pt")
    return ckpt, {k: v.clone() for k, v in model.state_dict().items()}


def test_export_equals_the_state_dict_bitwise(dcp_checkpoint, tmp_path, capsys):
    from softmoe.models import from_pretrained

    ckpt, want = dcp_checkpoint
    assert want["blocks.1.mlp.router.scale"].dim() == 0
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 0
    assert "exported" in capsys.readouterr().out
    got = from_pretrained(tmp_path / "out").state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the run directory (its latest checkpoint) exports the same
    assert main(["export", str(ckpt.parent.parent), str(tmp_path / "out2")]) == 0
    got2 = from_pretrained(tmp_path / "out2").state_dict()
    assert all(torch.equal(got2[k], want[k]) for k in want)


def test_export_errors_exit_2_with_a_clear_message(dcp_checkpoint, tmp_path, capsys):
    import shutil

    ckpt, _ = dcp_checkpoint
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "RUN_OR_CHECKPOINT" in err and "does not exist" in err
    (tmp_path / "file").write_text("x")
    assert main(["export", str(ckpt), str(tmp_path / "file")]) == 2
    assert "OUT" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    shard = next((broken / "dcp").glob("*.distcp"))
    shard.unlink()
    assert main(["export", str(broken), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing shard files" in err and shard.name in err
    assert not (tmp_path / "o").exists()
