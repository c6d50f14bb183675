"""Routing statistics, slot choice, heatmap PNG and report files of softmoe.eval.inspect."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import softmoe
from softmoe.eval.inspect import (choose_slots, dispatch_maps, inspect_model, patch_grid, routing_statistics,
                                  select_layers)

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, num_classes=5)


def tiny(name, **kw):
    from softmoe.models import create_model

    return create_model(name, **{**TINY, **kw}).eval()


def sharpen(model, scale=8.0):
    """Trained routers are peaked; a large router scale imitates that so the statistics differ per slot."""
    for _, m in softmoe.moe_layers(model):
        if isinstance(m, softmoe.SoftMoE):
            with torch.no_grad():
                m.router.scale.fill_(scale)
    return model


def reference_soft_stats(model, images):
    """The statistics from the full (M, N, S) weights of a single forward, in numpy float64."""
    out = {}
    with torch.no_grad(), softmoe.record_routing(model, metrics=True, weights=True):
        model.forward_features(images)
        for name, m in softmoe.moe_layers(model):
            B, N, E, P = m.routing_weights["dispatch"].shape
            d = m.routing_weights["dispatch"].reshape(B, N, E * P).double().numpy()
            c = m.routing_weights["combine"].reshape(B, N, E * P).double().numpy()
            ent = -(d * np.log(d)).sum(1).mean(0)  # (S,)
            mass = c.reshape(B, N, E, P).sum(-1)  # (B, N, E)
            out[name] = dict(ent=ent, dmax=d.max(1).mean(0), mass=mass.mean((0, 1)),
                             top=np.bincount(mass.argmax(-1).ravel(), minlength=E),
                             cent=-(c * np.log(c)).sum(-1).mean(), layer_metrics=dict(m.metrics), N=N, S=E * P)
    return out


def test_soft_statistics_match_reference_across_batches():
    torch.manual_seed(0)
    model = sharpen(tiny("soft_moe_micro", num_experts=6, moe_kwargs={"slots_per_expert": 2}))
    images = torch.randn(10, 3, 16, 16)
    stats = routing_statistics(model, images, batch_size=3)  # 4 uneven batches
    ref = reference_soft_stats(model, images)
    assert [s["name"] for s in stats] == list(ref)
    for s in stats:
        r = ref[s["name"]]
        assert s["kind"] == "soft" and s["num_experts"] == 6 and s["slots_per_expert"] == 2 and s["num_tokens"] == 16
        np.testing.assert_allclose([x["dispatch_entropy"] for x in s["slots"]], r["ent"], rtol=1e-6)
        np.testing.assert_allclose([x["dispatch_entropy_normalized"] for x in s["slots"]], r["ent"] / math.log(16),
                                   rtol=1e-6)
        np.testing.assert_allclose([x["dispatch_max"] for x in s["slots"]], r["dmax"], rtol=1e-6)
        np.testing.assert_allclose([x["combine_mass"] for x in s["experts"]], r["mass"], rtol=1e-6)
        assert sum(x["combine_mass"] for x in s["experts"]) == pytest.approx(1.0, abs=1e-6)  # float32 softmax
        assert [x["top_combine_tokens"] for x in s["experts"]] == r["top"].tolist()
        assert sum(x["top_combine_tokens"] for x in s["experts"]) == 10 * 16
        m = s["metrics"]
        assert m["combine_entropy_mean"] == pytest.approx(r["cent"], rel=1e-6)
        assert m["combine_entropy_normalized_mean"] == pytest.approx(r["cent"] / math.log(12), rel=1e-6)
        for key, value in r["layer_metrics"].items():  # vmoe names, same values as the layer's own
            assert m[key] == pytest.approx(float(value), rel=1e-5), key
        assert 0 < m["dispatch_entropy_normalized_mean"] < 1  # sharpened: not uniform


def test_uniform_routing_has_entropy_log_n():
    model = tiny("soft_moe_micro", num_experts=4)
    for _, m in softmoe.moe_layers(model):
        with torch.no_grad():
            m.router.scale.zero_()  # all logits 0: uniform dispatch and combine
    stats = routing_statistics(model, torch.randn(3, 3, 16, 16))
    for s in stats:
        assert s["metrics"]["dispatch_entropy_normalized_mean"] == pytest.approx(1.0, abs=1e-6)
        assert s["metrics"]["combine_entropy_normalized_mean"] == pytest.approx(1.0, abs=1e-6)
        assert s["metrics"]["dispatch_weights_max_mean"] == pytest.approx(1 / 16, abs=1e-7)
        assert all(e["combine_mass"] == pytest.approx(0.25, abs=1e-7) for e in s["experts"])


def test_choose_slots_auto_and_explicit():
    layer = {"name": "blocks.1.mlp", "slots": [{"dispatch_entropy": v} for v in [2.0, 0.5, 1.0, 3.0, 0.7]]}
    assert choose_slots(layer, "auto") == [1, 4, 2, 0]  # the 4 most peaked, most peaked first
    assert choose_slots(layer, "auto:2") == [1, 4]
    assert choose_slots(layer, "auto:9") == [1, 4, 2, 0, 3]
    assert choose_slots(layer, "3,0") == [3, 0]
    with pytest.raises(ValueError, match=r"\[5\] out of range.*5 slots"):
        choose_slots(layer, "0,5")
    with pytest.raises(ValueError, match="auto:K"):
        choose_slots(layer, "auto:x")
    with pytest.raises(ValueError, match="'auto'"):
        choose_slots(layer, "first")


def test_patch_grid_and_class_token():
    model = tiny("soft_moe_micro")
    assert patch_grid(model, 16) == (4, 4, 0)
    assert patch_grid(model, 17) == (4, 4, 1)  # a leading class token
    assert patch_grid(nn.Linear(1, 1), 9) == (3, 3, 0)
    with pytest.raises(ValueError, match="patch grid"):
        patch_grid(nn.Linear(1, 1), 10)


def test_inspect_model_writes_png_json_csv(tmp_path):
    torch.manual_seed(0)
    model = sharpen(tiny("soft_moe_micro", num_experts=4))
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    report = inspect_model(model, images, images[:2], tmp_path, slots="auto:3")
    soft = [s for s in report["layers"] if s["kind"] == "soft"]
    assert len(soft) == 1  # depth 2, MoE in the last half
    png = tmp_path / "dispatch_blocks_1_mlp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert soft[0]["plotted_slots"] == choose_slots(soft[0], "auto:3")
    saved = json.loads((tmp_path / "routing.json").read_text())
    assert saved["layers"][0]["metrics"] == pytest.approx(soft[0]["metrics"])
    with open(tmp_path / "experts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[0]["combine_mass"]) == pytest.approx(soft[0]["experts"][0]["combine_mass"])
    with open(tmp_path / "slots.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_heatmap_is_the_dispatch_of_the_slot():
    model = sharpen(tiny("soft_moe_micro", num_experts=4))
    x = torch.randn(2, 3, 16, 16)
    maps = dispatch_maps(model, x)
    (name, d), = maps.items()
    assert d.shape == (2, 16, 4)
    assert torch.allclose(d.sum(1), torch.ones(2, 4), atol=1e-5)  # a distribution over tokens per slot


@pytest.mark.parametrize("name", ["tc_moe_micro", "ec_moe_micro"])
def test_sparse_layers_report_load(name, tmp_path):
    model = tiny(name, num_experts=4)
    report = inspect_model(model, torch.randn(5, 3, 16, 16), torch.randn(2, 3, 16, 16), tmp_path)
    (s,) = report["layers"]
    assert s["kind"] in ("tokens_choice", "experts_choice") and len(s["experts"]) == 4
    assert 0.0 <= s["metrics"]["tokens_unprocessed_fraction"] <= 1.0
    assert any("no Soft MoE layer" in m for m in report["messages"])
    assert not list(tmp_path.glob("*.png"))
    if s["kind"] == "tokens_choice":
        # Each token makes k=1 choice: loads of kept choices plus the dropped fraction add to 1.
        assert sum(e["load"] for e in s["experts"]) + s["metrics"]["dropped_choices_fraction"] == pytest.approx(1.0)
        assert sum(e["choices"] for e in s["experts"]) == pytest.approx(1.0)
    else:
        assert s["metrics"]["experts_per_token_mean"] == pytest.approx(4 * s["capacity"] / 16)


def test_dense_model_and_layer_selection_errors():
    with pytest.raises(ValueError, match="no MoE layer"):
        routing_statistics(tiny("vit_micro"), torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no Soft MoE layer"):
        dispatch_maps(tiny("tc_moe_micro", num_experts=4), torch.randn(1, 3, 16, 16))
    stats = [{"name": "blocks.2.mlp", "kind": "soft"}, {"name": "blocks.3.mlp", "kind": "soft"}]
    assert select_layers(stats, "1") == [stats[1]]
    assert select_layers(stats, "blocks.2.mlp,1") == stats
    with pytest.raises(ValueError, match="blocks.2.mlp"):
        select_layers(stats, "7")


def test_statistics_with_prepare_equal_prepared_images():
    model = sharpen(tiny("soft_moe_micro", num_experts=4))
    raw = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    prepare = lambda b: b.float() / 127.5 - 1.0  # noqa: E731
    a = routing_statistics(model, raw, batch_size=2, prepare=prepare)
    b = routing_statistics(model, prepare(raw), batch_size=5)
    assert a[0]["metrics"] == pytest.approx(b[0]["metrics"], rel=1e-6)
    assert [s["dispatch_max"] for s in a[0]["slots"]] == pytest.approx([s["dispatch_max"] for s in b[0]["slots"]])


def test_class_token_model_draws_patches_only(tmp_path):
    model = tiny("soft_moe_micro", num_experts=4, pool="token")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    report = inspect_model(model, x, x, tmp_path, slots="0,1")
    assert report["layers"][0]["num_tokens"] == 17  # 16 patches + the class token
    assert (tmp_path / "dispatch_blocks_1_mlp.png").stat().st_size > 1000
