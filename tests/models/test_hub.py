"""Checkpoints (contracts.md "Checkpoints"): save_pretrained / from_pretrained round trips
bit-exactly in every dtype, is atomic, never unpickles, rejects foreign / truncated /
mismatched checkpoints with errors naming the file, key and expected value, and resamples
the position embedding for another image size (Soft MoE slot count unchanged).

Device-agnostic where tensors are computed (tests/conftest.py): models saved from and loaded
onto the `device` under test (`from_pretrained(..., device=device)`), forwards and resampling
there. The tests of the files themselves (format, atomicity, no unpickling, the errors) are
`cpu_only`: they compute nothing on a device."""
import json
import os
import pickle

import pytest
import torch

from softmoe.models import create_model
from softmoe.models import hub
from softmoe.models.hub import (adapt_state_dict, from_pretrained, load_config, load_weights, resample_pos_embed,
                                save_pretrained)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=48, num_classes=5,
            num_experts=4)


def _model(name="soft_moe_micro", **overrides):
    cfg = dict(TINY)
    if name.startswith("vit"):
        cfg.pop("num_experts")
    cfg.update(overrides)
    return create_model(name, **cfg)


# The checkpoint files themselves (bytes, JSON, error messages): nothing to compute on a device.
FILE_FORMAT = pytest.mark.cpu_only


def _bits(t: torch.Tensor) -> torch.Tensor:
    """An integer view of the tensor's bytes, so that equality is bitwise (NaN, -0.0 too)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_bit_exact(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(_bits(a[k]), _bits(b[k])), k


@pytest.mark.parametrize("name", ["vit_micro", "soft_moe_micro", "tc_moe_micro", "ec_moe_micro"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, name, dtype, device, generator):
    model = _model(name).to(dtype).to(device)  # saved from the device under test
    with torch.no_grad():  # non-trivial head and a -0.0 to be sure every bit survives
        model.head.weight.normal_()
        model.pos_embed[0, 0, 0] = -0.0
    out = save_pretrained(model, tmp_path / "a" / "b")  # nested directory is created
    assert out == tmp_path / "a" / "b"
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = from_pretrained(out, device=device)
    assert loaded.config == model.config
    _assert_bit_exact(model.state_dict(), loaded.state_dict())
    assert torch.signbit(loaded.pos_embed[0, 0, 0])
    model.eval(), loaded.eval()
    x = torch.rand(2, 3, 16, 16, generator=generator, device=device).to(dtype) * 2 - 1
    assert torch.equal(model(x), loaded(x))


@FILE_FORMAT
def test_round_trip_keeps_mixed_dtypes_and_method(tmp_path):
    model = _model()
    model.blocks[1].mlp.experts.to(torch.bfloat16)  # e.g. experts stored in bf16, the rest in f32
    model.save_pretrained(tmp_path)  # the method is the same function
    loaded = from_pretrained(tmp_path)
    _assert_bit_exact(model.state_dict(), loaded.state_dict())
    assert loaded.blocks[1].mlp.experts.w1.dtype == torch.bfloat16
    assert loaded.blocks[0].attn.qkv.weight.dtype == torch.float32
    assert all(p.requires_grad for p in loaded.parameters())


def test_from_pretrained_device_dtype(tmp_path, device):
    save_pretrained(_model(), tmp_path)
    loaded = from_pretrained(tmp_path, device=device, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert {p.device for p in loaded.parameters()} == {torch.empty(0, device=device).device}


@FILE_FORMAT
def test_config_json_format(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc == {"format": "softmoe", "format_version": 2, "architecture": "vit", "config": model.config.to_dict()}
    assert doc["config"]["moe"] == {"type": "SoftMoE", "num_experts": 4, "placement": "last_half"}
    assert load_config(tmp_path) == model.config
    assert hub.is_pretrained_dir(tmp_path) and not hub.is_pretrained_dir(tmp_path / "x")


# config.json as softmoe wrote it before the typed MoE section (format_version 1, flat MoE keys).
OLD_CONFIG = {"format": "softmoe", "format_version": 1, "architecture": "vit", "config": {
    "img_size": 16, "patch_size": 4, "in_chans": 3, "num_classes": 5, "embed_dim": 32, "depth": 2, "num_heads": 2,
    "mlp_dim": 48, "qkv_bias": True, "qk_norm": True, "pool": "gap", "layer_norm_eps": 1e-06,
    "moe_type": "TokensChoiceMoE", "num_experts": 4, "moe_placement": [1],
    "moe_kwargs": {"k": 2, "capacity_factor": 2.0},
    "name": "tc_moe_micro"}}


@FILE_FORMAT
def test_format_version_1_checkpoints_load_unchanged(tmp_path):
    model = _model("tc_moe_micro", moe_placement=[1], moe_kwargs={"k": 2, "capacity_factor": 2.0})
    save_pretrained(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(OLD_CONFIG))
    loaded = from_pretrained(tmp_path)
    assert loaded.config == model.config
    moe = loaded.config.moe
    assert (moe.type, moe.num_experts, moe.placement, moe.k, moe.capacity_factor) == ("TokensChoiceMoE", 4, [1], 2, 2.0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    dense = {**OLD_CONFIG, "config": {**OLD_CONFIG["config"], "moe_type": None, "num_experts": 0, "moe_kwargs": {},
                                      "moe_placement": "last_half"}}
    (tmp_path / "config.json").write_text(json.dumps(dense))
    assert load_config(tmp_path).moe is None


@FILE_FORMAT
def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    old = _model()
    save_pretrained(old, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")  # a crash midway through the write
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(_model(embed_dim=64), tmp_path)
    after = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    assert after == before  # old checkpoint intact, temp file removed


@FILE_FORMAT
def test_loading_never_unpickles(tmp_path, monkeypatch):
    save_pretrained(_model(), tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    from_pretrained(tmp_path)
    # A pickle disguised as the weights file is rejected, not executed.
    (tmp_path / "model.safetensors").write_bytes(pickle.dumps({"x": 1}, protocol=2))
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(tmp_path)


# -- errors ------------------------------------------------------------------------------------
@FILE_FORMAT
def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)  # empty directory: not ours
    save_pretrained(_model(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("doc, match", [
    ({"model_type": "vit", "hidden_size": 768}, "expected \"format\": 'softmoe'"),  # transformers' config.json
    ([1, 2], "not a softmoe config"),
    ({"format": "softmoe", "format_version": 3, "architecture": "vit", "config": {}}, "format_version 3"),
    ({"format": "softmoe", "format_version": 1, "architecture": "resnet", "config": {}}, "expected 'vit'"),
    ({"format": "softmoe", "format_version": 1, "architecture": "vit", "config": {"embed_dimm": 8}},
     "unknown ViTConfig field.*embed_dimm"),
])
@FILE_FORMAT
def test_foreign_or_bad_config(tmp_path, doc, match):
    save_pretrained(_model(), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


@FILE_FORMAT
def test_invalid_json(tmp_path):
    save_pretrained(_model(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        from_pretrained(tmp_path)


@FILE_FORMAT
@pytest.mark.parametrize("keep", [0, 5, 100, -10])
def test_truncated_weights(tmp_path, keep):
    save_pretrained(_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        from_pretrained(tmp_path)


@FILE_FORMAT
def test_shape_mismatch_names_key_and_expected_shape(tmp_path):
    save_pretrained(_model(), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["config"]["mlp_dim"] = 40  # config no longer matches the weights
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"model.safetensors.*'blocks.0.mlp.fc1.bias' has shape \(48,\).*"
                                         r"expected \(40,\)"):
        from_pretrained(tmp_path)


@FILE_FORMAT
def test_override_changing_other_shapes_is_an_error(tmp_path):
    save_pretrained(_model(), tmp_path)
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.experts.w1' has shape \(4, 32, 48\), expected \(6, 32, 48\)"):
        from_pretrained(tmp_path, num_experts=6)
    with pytest.raises(ValueError, match=r"'patch_embed.proj.weight' has shape \(32, 3, 4, 4\), "
                                         r"expected \(32, 3, 8, 8\)"):
        from_pretrained(tmp_path, patch_size=8)
    with pytest.raises(ValueError, match="missing tensors.*cls_token"):
        from_pretrained(tmp_path, pool="token")
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        from_pretrained(tmp_path, img_sise=32)


@FILE_FORMAT
def test_missing_and_unexpected_keys(tmp_path):
    model = _model()
    state = model.state_dict()
    del state["norm.weight"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"mine does not match the model .*missing tensors \['norm.weight'\]; "
                                         r"unexpected tensors \['extra'\]"):
        load_weights(model, state, source="mine")


@FILE_FORMAT
def test_rejects_non_models(tmp_path):
    with pytest.raises(ValueError, match="VisionTransformer"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)


# -- image size / position embedding ------------------------------------------------------------
def test_img_size_override_resamples_pos_embed_only(tmp_path, device, generator):
    model = _model().to(device)  # 16 px, patch 4: 4x4 grid
    save_pretrained(model, tmp_path)
    big = from_pretrained(tmp_path, img_size=32, device=device)  # 8x8 grid
    assert big.config.img_size == 32 and big.pos_embed.shape == (1, 64, 32)
    assert torch.equal(big.pos_embed, resample_pos_embed(model.pos_embed.detach(), 8))
    src, dst = model.state_dict(), big.state_dict()
    for k in src:
        if k != "pos_embed":
            assert torch.equal(src[k], dst[k]), k
    # The Soft MoE slot count does not depend on the number of tokens (docs/design.md §1).
    assert big.blocks[1].mlp.num_slots == model.blocks[1].mlp.num_slots == 4
    big.eval()
    assert big(torch.rand(2, 3, 32, 32, generator=generator, device=device)).shape == (2, 5)
    small = from_pretrained(tmp_path, img_size=8, device=device)  # shrinking works too (2x2 grid)
    assert small.pos_embed.shape == (1, 4, 32)


def test_num_classes_override_gives_fresh_head(tmp_path, device, generator):
    model = _model().to(device)
    with torch.no_grad():
        model.head.weight.normal_()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path, num_classes=3, device=device)
    assert loaded.head.weight.shape == (3, 32) and torch.equal(loaded.head.weight, torch.zeros(3, 32, device=device))
    assert torch.allclose(loaded.head.bias, torch.full((3,), -torch.log(torch.tensor(3.0)).item(), device=device))
    assert torch.equal(loaded.norm.weight, model.norm.weight)
    headless = from_pretrained(tmp_path, num_classes=0, device=device)
    assert headless(torch.rand(1, 3, 16, 16, generator=generator, device=device)).shape == (1, 32)


def test_load_weights_into_model_of_other_size_keeps_its_dtype(device):
    src = _model(img_size=32).to(device)  # 8x8 grid
    dst = _model(img_size=16).to(torch.float64).to(device)  # 4x4 grid
    load_weights(dst, src.state_dict())
    assert dst.pos_embed.dtype == torch.float64
    assert torch.equal(dst.pos_embed, resample_pos_embed(src.pos_embed.detach(), 4).double())
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight.double())
    with pytest.raises(ValueError, match="pos_embed"):
        adapt_state_dict(dst, {**src.state_dict(), "pos_embed": torch.zeros(1, 64, 16, device=device)})  # wrong width


def test_resample_identity_and_constant(device, generator):
    pos = torch.randn(1, 16, 8, generator=generator, device=device)
    assert resample_pos_embed(pos, 4) is pos
    const = torch.full((1, 9, 3), 0.7, device=device)
    for grid in (6, 2, (3, 5)):
        out = resample_pos_embed(const, grid)
        n = grid * grid if isinstance(grid, int) else grid[0] * grid[1]
        assert out.shape == (1, n, 3)
        torch.testing.assert_close(out, torch.full((1, n, 3), 0.7, device=device), rtol=0, atol=1e-6)


def test_resample_orientation_and_linear_ramps(device):
    """Channel 0 = row index, channel 1 = column index on an 8x8 grid, upsampled to 16x16:
    rows stay rows (a transposed reshape would swap the channels), and the antialiased
    bicubic kernel (a = -0.5) reproduces linear ramps exactly away from the border."""
    old, new = 8, 16
    r, c = torch.meshgrid(torch.arange(old, dtype=torch.float64, device=device),
                          torch.arange(old, dtype=torch.float64, device=device), indexing="ij")
    pos = torch.stack([r, c], -1).reshape(1, old * old, 2)
    out = resample_pos_embed(pos, new).reshape(new, new, 2)
    assert out.dtype == torch.float64
    src = (torch.arange(new, dtype=torch.float64, device=device) + 0.5) * old / new - 0.5  # align_corners=False
    inner = slice(4, new - 4)  # the 4-tap kernel needs no clamped neighbour here
    torch.testing.assert_close(out[inner, inner, 0], src[inner, None].expand(8, 8), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[inner, inner, 1], src[None, inner].expand(8, 8), rtol=0, atol=1e-12)


def test_resample_dtype_and_errors(device, generator):
    pos = torch.randn(1, 16, 4, generator=generator, device=device).bfloat16()
    out = resample_pos_embed(pos, 6)
    assert out.dtype == torch.bfloat16
    ref = resample_pos_embed(pos.float(), 6).bfloat16()  # computed in float32, rounded once
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(torch.zeros(1, 12, 4, device=device), 4)
    resample_pos_embed(torch.zeros(1, 12, 4, device=device), (6, 4), old_grid=(3, 4))
    with pytest.raises(ValueError, match="does not match"):
        resample_pos_embed(torch.zeros(1, 12, 4, device=device), 4, old_grid=(3, 3))
    with pytest.raises(ValueError, match="new_grid"):
        resample_pos_embed(torch.zeros(1, 16, 4, device=device), 0)
    with pytest.raises(ValueError, match=r"shape \(1, tokens, dim\)"):
        resample_pos_embed(torch.zeros(16, 4, device=device), 4)


def test_exports():
    import softmoe.models as m

    assert m.from_pretrained is from_pretrained and m.save_pretrained is save_pretrained
    assert hub.CONFIG_NAME == "config.json" and hub.WEIGHTS_NAME == "model.safetensors"


@pytest.mark.cpu_only  # a subprocess
def test_load_model_finds_a_training_workdir_without_softmoe_train(tmp_path):
    """softmoe.models reads training work directories itself: evaluation never imports
    softmoe.train (and softmoe.models never does)."""
    import subprocess
    import sys

    model = _model()
    ckpt = hub.checkpoint_dir(tmp_path, 7)
    save_pretrained(model, ckpt)
    (ckpt / hub.TRAIN_STATE).write_bytes(b"")
    (ckpt / hub.TRAIN_CONFIG).write_text(json.dumps({"model": {"name": "soft_moe_micro"}, "data": "digits"}))
    (hub.checkpoint_dir(tmp_path, 9)).mkdir()  # incomplete: ignored
    assert hub.latest_checkpoint(tmp_path) == ckpt and hub.list_checkpoints(tmp_path) == [(7, ckpt)]
    code = (f"import sys; from softmoe.eval.loading import load_checkpoint; m, c = load_checkpoint({str(tmp_path)!r}); "
            f"assert c['data'] == 'digits' and not m.training; "
            f"assert not [n for n in sys.modules if n.startswith('softmoe.train')], 'softmoe.train was imported'")
    import softmoe

    root = os.path.dirname(os.path.dirname(softmoe.__file__))  # this checkout, not an installed copy
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})
    loaded, cfg = hub.load_model(ckpt)
    assert cfg["model"] == {"name": "soft_moe_micro"}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
