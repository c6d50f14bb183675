"""The paper's optimiser rules: weight-decay groups, decoupled decay scaled by the learning
rate, and the schedules, checked against formulas written out in float64.

The optimiser steps are device-agnostic (tests/conftest.py): parameters and gradients on the
`device` under test, the float64 formulas computed there at the same 1e-12; the parameter
groups and the schedules compute nothing."""
import math

import pytest
import torch

from softmoe.models import create_model
from softmoe.train import TrainConfig
from softmoe.train.optim import build_optimizer, make_schedule, param_groups


def micro():
    return create_model("soft_moe_micro", img_size=8, patch_size=4, in_chans=1, num_classes=10)


def test_param_groups_follow_the_paper():
    model = micro()
    groups = {g["name"]: (set(g["param_names"]), g["weight_decay"]) for g in param_groups(model, 0.03, 3.0)}
    decay, wd = groups["decay"]
    head, head_wd = groups["head"]
    none, zero = groups["no_decay"]
    assert (wd, head_wd, zero) == (0.03, 3.0, 0.0)
    assert head == {"head.weight"}
    assert "head.bias" in none and "pos_embed" in none
    assert any(n.endswith("router.phi") for n in none) and not any(n.endswith("router.phi") for n in decay)
    assert any(n.endswith("router.scale") for n in decay)  # docs/design.md §4: scale is decayed
    assert any(n.endswith("experts.w1") for n in decay) and any(n.endswith("experts.b1") for n in none)
    assert all(not n.endswith(("bias", "norm1.weight", "norm2.weight")) for n in decay)
    assert none == model.no_weight_decay()
    names = {n for n, _ in model.named_parameters()}
    assert decay | head | none == names and not (decay & none) and not (decay & head)
    # without a separate head decay the head kernel decays like every kernel
    merged = {g["name"]: set(g["param_names"]) for g in param_groups(model, 0.03, None)}
    assert "head" not in merged and "head.weight" in merged["decay"]


def test_adamw_decay_is_scaled_by_the_learning_rate(device, generator):
    """One step of build_optimizer's AdamW equals p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
    (big_vision's decoupled decay), computed here in float64."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double().to(device)
    cfg = TrainConfig(steps=1, lr=0.1, weight_decay=0.5, beta1=0.9, beta2=0.999, eps=1e-8)
    opt = build_optimizer(model, cfg)
    w0 = model.weight.detach().clone()
    b0 = model.bias.detach().clone()
    g = torch.randn(2, 3, dtype=torch.float64, generator=generator, device=device)
    model.weight.grad = g.clone()
    model.bias.grad = torch.ones(2, dtype=torch.float64, device=device)
    opt.step()
    m_hat = g  # (1 - b1) g / (1 - b1)
    v_hat = g * g
    expected = w0 - 0.1 * (m_hat / (v_hat.sqrt() + 1e-8) + 0.5 * w0)
    assert torch.allclose(model.weight.detach(), expected, rtol=0, atol=1e-12)
    # the bias has no decay (1-dim parameter of a model without no_weight_decay())
    assert torch.allclose(model.bias.detach(), b0 - 0.1 * (1 / (1 + 1e-8)), rtol=0, atol=1e-12)


def test_adam_option_is_coupled_l2(device):
    model = torch.nn.Linear(2, 1, bias=False).double().to(device)
    opt = build_optimizer(model, TrainConfig(steps=1, optimizer="adam", lr=0.1, weight_decay=0.5))
    w0 = model.weight.detach().clone()
    model.weight.grad = torch.zeros_like(w0)
    opt.step()
    g = 0.5 * w0  # L2 enters the gradient, then Adam normalises it to a unit step
    assert torch.allclose(model.weight.detach(), w0 - 0.1 * g / (g.abs() + 1e-8), atol=1e-12)


def test_rsqrt_schedule_matches_spec():
    cfg = TrainConfig(steps=1, lr=1e-3, schedule="rsqrt", warmup_steps=10_000, rsqrt_timescale=10_000,
                      cooldown_steps=50_000)
    lr = make_schedule(cfg, 300_000)
    assert lr(0) == 0.0 and lr(5_000) == pytest.approx(5e-4, rel=1e-12)
    assert lr(10_000) == pytest.approx(1e-3, rel=1e-12)
    assert lr(50_000) == pytest.approx(1e-3 / math.sqrt(1 + 40_000 / 10_000), rel=1e-12)
    # linear cooldown over the last 50k steps
    assert lr(250_000) == pytest.approx(1e-3 / math.sqrt(1 + 240_000 / 10_000), rel=1e-12)
    assert lr(275_000) == pytest.approx(0.5 * 1e-3 / math.sqrt(1 + 265_000 / 10_000), rel=1e-12)
    assert lr(299_999) == pytest.approx(1e-3 / math.sqrt(1 + 289_999 / 10_000) / 50_000, rel=1e-9)


def test_cosine_and_constant_schedules():
    cfg = TrainConfig(steps=1, lr=2.0, schedule="cosine", warmup_steps=10, min_lr=0.5)
    lr = make_schedule(cfg, 110)
    assert lr(5) == pytest.approx(1.0) and lr(10) == pytest.approx(2.0)
    assert lr(60) == pytest.approx(0.5 + 1.5 * 0.5) and lr(110) == pytest.approx(0.5)
    const = make_schedule(TrainConfig(steps=1, lr=0.3, schedule="constant"), 5)
    assert [const(s) for s in range(5)] == [0.3] * 5
    with pytest.raises(ValueError, match="warmup_steps=10 must be smaller"):
        make_schedule(TrainConfig(steps=1, warmup_steps=10), 10)
    with pytest.raises(ValueError, match="cooldown_steps=20 exceeds"):
        make_schedule(TrainConfig(steps=1, cooldown_steps=20), 10)
