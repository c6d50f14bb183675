"""softmoe models through timm's tools (issue 19): features_only backbones that train and report
routing, layer-wise LR decay, timm's data pipeline and training pieces, and timm ViTs converted
with `timm_to_moe`. timm's own tests/test_models.py is run by test_timm_suite.py. Tiny models only.
Skipped when timm (which needs torchvision) cannot be imported.

Device-agnostic (tests/conftest.py): every model that computes is on the `device` under test,
images drawn there (timm's loader yields CPU batches, moved there as a training loop does);
float64 tolerances unchanged. The subprocess test is `cpu_only`; the fx-leaf registration
test traces symbolically and computes nothing."""
import math

import pytest
import torch

import softmoe
from softmoe.layers import Experts, SoftMoE, TokensChoiceMoE
from softmoe.models.timm_interop import import_timm, register_timm_models

try:
    timm = import_timm()
except (ImportError, RuntimeError) as e:  # timm or torchvision missing (or a broken torchvision build)
    pytest.skip(f"timm is not importable ({type(e).__name__}: {e}); install it as docs/models.md says",
                allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_timm_models("*_micro")


def _images(n=2, size=32, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g, dtype=torch.float64, device=device) * 2 - 1).to(dtype)


# -- 1. features_only backbones: training, routing metrics, aux losses, the fused path -----------
def test_features_only_soft_moe_backbone_trains_one_step_and_reports_routing(device):
    torch.manual_seed(0)
    net = timm.create_model("soft_moe_micro", features_only=True, out_indices=(1, 3)).to(device)
    assert type(net).__name__ == "FeatureGetterNet" and net.feature_info.module_name() == ["blocks.1", "blocks.3"]
    moe = dict(softmoe.moe_layers(net))
    assert sorted(moe) == ["model.blocks.2.mlp", "model.blocks.3.mlp"]  # soft_moe_micro: MoE in the last half
    assert all(isinstance(m, SoftMoE) for m in moe.values())
    fused = []  # whether each Experts forward took the fused path (it must, through the wrapper too)
    hooks = [m.register_forward_pre_hook(lambda mod, args: fused.append(mod.fused_applies(args[0])))
             for m in net.modules() if isinstance(m, Experts)]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with softmoe.record_routing(net):
        feats = net(_images(device=device))
        metrics = softmoe.collect_metrics(net)
    for h in hooks:
        h.remove()
    assert [tuple(f.shape) for f in feats] == [(2, 64, 8, 8)] * 2
    loss = sum(f.square().mean() for f in feats)
    loss.backward()
    opt.step()
    assert fused == [True, True]
    for name in moe:  # every MoE layer reports its routing metrics, all finite
        keys = [k for k in metrics if k.startswith(name + "/")]
        assert keys and all(math.isfinite(metrics[k]) for k in keys), (name, metrics)
    assert len(metrics) == sum(1 for k in metrics if k.split("/")[0] in moe)
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    for name in moe:  # the routing parameters and the experts got gradients and moved
        assert {f"{name}.router.phi", f"{name}.experts.w1"} <= changed, sorted(changed)
    assert not any(m.record_metrics for m in moe.values())  # record_routing restored the flags


def test_features_only_backbone_fused_gradients_equal_reference(device):
    """The fused path (hand-written backward) and impl="reference" (plain autograd) give the same
    gradients through timm's wrapper. float64; tolerance 1e-10 (a few float64 ulps per op, summed
    over a 4-block model)."""
    torch.manual_seed(0)
    fused = timm.create_model("soft_moe_micro", features_only=True).double().to(device)
    ref = timm.create_model("soft_moe_micro", features_only=True, moe_kwargs={"impl": "reference"}).double()
    ref = ref.to(device)
    ref.load_state_dict(fused.state_dict())
    assert ref.model.blocks[3].mlp.experts.impl == "reference" and fused.model.blocks[3].mlp.experts.impl == "fused"
    x = _images(dtype=torch.float64, device=device)
    for net in (fused, ref):
        sum((f * f).mean() for f in net(x)).backward()
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=name)


def test_features_only_tokens_choice_backbone_aux_loss(device):
    torch.manual_seed(0)
    net = timm.create_model("tc_moe_micro", features_only=True).to(device)
    assert all(isinstance(m, TokensChoiceMoE) for _, m in softmoe.moe_layers(net))
    x = _images(device=device)
    torch.manual_seed(1)  # the gate's training noise (noise_std 1.0; seeds the CUDA generators too)
    feats = net(x)
    aux = softmoe.collect_aux_loss(net)
    assert aux.ndim == 0 and torch.isfinite(aux) and aux > 0
    # the same value as the unwrapped model with the same weights and noise
    plain = softmoe.models.create_model("tc_moe_micro").train().to(device)
    missing = plain.load_state_dict(net.model.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]  # pruned by the wrapper
    torch.manual_seed(1)
    plain(x)
    torch.testing.assert_close(softmoe.collect_aux_loss(plain), aux, rtol=0, atol=0)  # same ops, same order
    (sum(f.mean() for f in feats) + aux).backward()
    for name, m in softmoe.moe_layers(net):
        g = m.gate.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name


# -- 2. layer-wise LR decay (timm.optim) ----------------------------------------------------------
def _group_of(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("filter_bias_and_bn", [True, False])
def test_layer_decay_groups_follow_group_matcher_and_no_weight_decay(filter_bias_and_bn, device):
    import timm.optim
    import timm.scheduler

    torch.manual_seed(0)
    model = timm.create_model("soft_moe_micro", num_classes=3).to(device)
    lr, decay = 1e-3, 0.75
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05, layer_decay=decay,
                                         filter_bias_and_bn=filter_bias_and_bn)
    group = _group_of(opt, model)
    assert set(group) == {n for n, _ in model.named_parameters()}  # every parameter, once
    # group_matcher: stem (layer 0), blocks 0..3 (layers 1..4), the final norm with the last block (timm's
    # MATCH_PREV_GROUP, as for timm's ViTs), the head unmatched: timm's last layer (5, full lr)
    depth = {"pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.qkv.weight": 1,
             "blocks.1.mlp.fc1.weight": 2, "blocks.2.mlp.router.phi": 3, "blocks.3.mlp.experts.w1": 4,
             "blocks.3.mlp.router.scale": 4, "norm.weight": 4, "head.weight": 5}
    for name, layer in depth.items():
        assert group[name]["lr_scale"] == pytest.approx(decay ** (5 - layer)), name
    assert len({g["lr_scale"] for g in opt.param_groups}) == 6  # distinct per block
    # no_weight_decay(): router phi (a 3-D tensor), biases, norms, embeddings get none; kernels do
    nwd = model.no_weight_decay()
    assert "blocks.3.mlp.router.phi" in nwd
    params = dict(model.named_parameters())
    for name, g in group.items():
        skip = name in nwd or (filter_bias_and_bn and params[name].ndim <= 1)  # timm's rule
        assert g["weight_decay"] == (0.0 if skip else 0.05), name
    # so without timm's 1-D filter exactly the paper's set is decayed: no 0-/1-D tensor but the router scales
    assert {n for n, p in params.items() if p.ndim <= 1 and n not in nwd} == {f"blocks.{i}.mlp.router.scale"
                                                                               for i in (2, 3)}
    # the router scale: decayed as in the paper (docs/design.md §4) only with filter_bias_and_bn=False
    # (timm's default also skips every 0-/1-D tensor)
    assert group["blocks.3.mlp.router.scale"]["weight_decay"] == (0.0 if filter_bias_and_bn else 0.05)
    # timm's scheduler applies lr_scale; one AdamW step moves each tensor by <= its group's lr
    sched, _ = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=2, warmup_epochs=0)
    sched.step(0)
    assert sorted({g["lr_scale"] for g in opt.param_groups}) == pytest.approx([decay ** k for k in range(5, -1, -1)])
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(lr * g["lr_scale"])
    with torch.no_grad():  # the head starts at zero (vmoe), which would stop every gradient below it
        model.head.weight.normal_(std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(_images(device=device)), torch.tensor([0, 2], device=device)).backward()
    opt.step()
    for name, p in model.named_parameters():
        step = (p.detach() - before[name]).abs().max().item()
        g = group[name]
        # first AdamW step: |update| <= lr (|m / sqrt(v)| <= 1) plus the decay lr * wd * |w|, plus float32
        # rounding of w - update (2 ulps of |w| + lr)
        w = before[name].abs().max().item()
        bound = g["lr"] * (1 + g["weight_decay"] * w) + 2 * torch.finfo(torch.float32).eps * (w + g["lr"])
        assert step <= bound, (name, step, bound)
        if name in ("blocks.3.mlp.experts.w1", "blocks.0.attn.qkv.weight", "pos_embed", "head.weight"):
            assert step > 0.5 * g["lr"], (name, step, g["lr"])  # it moved, at its own scale


# -- 3. timm's data pipeline and training pieces on a tiny ImageFolder ---------------------------
def _image_folder(root, classes=("cat", "dog"), per_class=4, size=32):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "train" / c / f"{i}.png")
    return root


def test_timm_data_pipeline_and_training_loop(tmp_path, device):
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import timm.utils

    root = _image_folder(tmp_path)
    dataset = timm.data.create_dataset("", root=str(root), split="train", is_training=True)
    assert len(dataset) == 8 and dataset.reader.class_to_idx == {"cat": 0, "dog": 1}
    torch.manual_seed(0)
    model = timm.create_model("soft_moe_micro", num_classes=2).to(device)
    cfg = timm.data.resolve_data_config(model=model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    loader = timm.data.create_loader(dataset, input_size=cfg["input_size"], batch_size=4, is_training=True,
                                     use_prefetcher=False, num_workers=0, mean=cfg["mean"], std=cfg["std"],
                                     interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"])
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.min() >= -1 and images.max() <= 1  # [-1, 1], as ours
    # a timm-style loop (as timm's train.py): mixup, soft-target CE, layer decay, scheduler, clipping, EMA
    mixup = timm.data.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=2)
    loss_fn = timm.loss.SoftTargetCrossEntropy()
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, "cosine", num_epochs=2, warmup_epochs=1, warmup_lr=1e-4,
                                                  step_on_epochs=False, updates_per_epoch=len(loader))
    ema = timm.utils.ModelEmaV3(model, decay=0.9)
    meter = timm.utils.AverageMeter()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    step = 0
    for _ in range(2):
        for images, labels in loader:
            images, targets = mixup(images.to(device), labels.to(device))  # the loader's CPU batch, moved
            with softmoe.record_routing(model):
                loss = loss_fn(model(images), targets) + softmoe.collect_aux_loss(model)  # 0 for Soft MoE
                metrics = softmoe.collect_metrics(model)
            opt.zero_grad()
            loss.backward()
            timm.utils.dispatch_clip_grad(model.parameters(), value=1.0, mode="norm")
            opt.step()
            step += 1
            sched.step_update(num_updates=step)
            ema.update(model, step=step)
            meter.update(loss.item(), images.shape[0])
            assert math.isfinite(loss.item()) and metrics and all(math.isfinite(v) for v in metrics.values())
    assert step == 4 and meter.count == 16 and math.isfinite(meter.avg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"head.weight", "blocks.3.mlp.router.phi", "blocks.3.mlp.experts.w1"} <= changed
    assert not torch.equal(ema.module.head.weight, model.head.weight)  # the EMA lags
    model.eval()
    with torch.no_grad():
        eval_loader = timm.data.create_loader(dataset, input_size=cfg["input_size"], batch_size=8, is_training=False,
                                              use_prefetcher=False, num_workers=0, mean=cfg["mean"], std=cfg["std"],
                                              crop_pct=cfg["crop_pct"])
        images, labels = next(iter(eval_loader))
        top1, = timm.utils.accuracy(model(images.to(device)), labels.to(device), topk=(1,))
    assert 0 <= top1.item() <= 100


@pytest.mark.cpu_only  # a subprocess
def test_timm_register_module_registers_on_import():
    """`train.py --device-modules softmoe.models.timm_register` (docs/models.md): train.py imports
    timm first, then the module, then builds the model. A fresh interpreter, as train.py is."""
    import os
    import pathlib
    import subprocess
    import sys

    code = ("import importlib, timm; importlib.import_module('softmoe.models.timm_register'); "
            "m = timm.create_model('soft_moe_micro', num_classes=2); print(type(m).__module__, m.num_classes)")
    root = str(pathlib.Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root}).stdout
    assert out.split() == ["softmoe.models.vit", "2"]


# -- 4. timm ViTs converted with timm_to_moe keep timm's contract -----------------------------------
@pytest.mark.parametrize("moe_type", ["soft", "tc"])
def test_timm_to_moe_model_keeps_timm_contract(moe_type, device):
    import timm.optim
    from timm.models import create_feature_extractor, get_graph_node_names
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from softmoe.models.timm_interop import timm_to_moe

    torch.manual_seed(0)
    dense = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).to(device)
    model = timm_to_moe(dense, moe_type, num_experts=4, placement="last_half").eval()
    layer = model.blocks[1].mlp
    x = _images(device=device)
    assert model.num_classes == 5 and model.num_features == model.head_hidden_size == 32
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 32)  # 16 patches + the class token
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 32)
    torch.testing.assert_close(model.forward_head(feats), model.head(pre), rtol=0, atol=0)
    torch.testing.assert_close(model(x), model.forward_head(feats), rtol=0, atol=0)
    final, inter = model.forward_intermediates(x, indices=[0, 1])
    assert [tuple(t.shape) for t in inter] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(final, feats, rtol=0, atol=0)
    # torch.fx, as timm's test_model_forward_fx: the MoE layer is one leaf call, outputs equal eager
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "blocks.1.mlp" in eval_nodes and not any(n.startswith("blocks.1.mlp.") for n in eval_nodes)
    assert any(n.startswith("blocks.0.mlp.") for n in eval_nodes)  # the dense block is traced through
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]]).eval()
    assert [n.target for n in fx_model.graph.nodes if n.op == "call_module" and "blocks.1.mlp" in str(n.target)] \
        == ["blocks.1.mlp"]
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx_model(x).values())), model(x), rtol=0, atol=0)  # same ops
    # weight decay: the converted model's no_weight_decay() adds the MoE layer's router phi and biases
    nwd = model.no_weight_decay()
    assert {"cls_token", "pos_embed"} <= nwd and {"blocks.1.mlp.experts.b1", "blocks.1.mlp.experts.b2"} <= nwd
    assert ("blocks.1.mlp.router.phi" in nwd) == (moe_type == "soft")
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    group = _group_of(opt, model)
    if moe_type == "soft":
        assert group["blocks.1.mlp.router.phi"]["weight_decay"] == 0.0
    assert group["blocks.1.mlp.experts.w1"]["weight_decay"] == 0.05
    assert group["blocks.1.mlp.experts.w1"]["lr_scale"] == pytest.approx(0.75 ** 1)  # block 1 of 2, head last
    # reset_classifier: a new head, and 0 -> pooled features
    model.reset_classifier(3)
    model.to(device)  # timm builds the new head on the CPU
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert layer is model.blocks[1].mlp and isinstance(layer, (SoftMoE, TokensChoiceMoE))


def test_timm_to_moe_registers_the_fx_leaves_itself(monkeypatch):
    """Without register_timm_models(): timm_to_moe marks the MoE layers as timm fx leaves."""
    import timm.layers._fx as timm_fx
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from softmoe.models.timm_interop import timm_to_moe

    monkeypatch.setattr(timm_fx, "_leaf_modules", set())  # as in a fresh process
    dense = TimmViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    timm_to_moe(dense, "ec", num_experts=2, placement=[1])
    assert {SoftMoE, TokensChoiceMoE} <= set(timm_fx.get_notrace_modules())
    from timm.models import get_graph_node_names

    _, eval_nodes = get_graph_node_names(timm_to_moe(dense, "soft", num_experts=2, placement=[1]))
    assert "blocks.1.mlp" in eval_nodes and not any(n.startswith("blocks.1.mlp.") for n in eval_nodes)
