"""The training loop: outputs of a run, exact resume, divergence, bad input, the CLI."""
import json
import math
import os
import shutil

import pytest
import torch

from softmoe.train import TrainingDiverged, load_model, train
from softmoe.train import trainer as trainer_mod
from softmoe.train.checkpoint import latest_checkpoint, list_checkpoints, load_train_state

from softmoe.train import ModelConfig
from train_helpers import TINY_MODEL, tiny_config


def quiet(*args, **kwargs):
    pass


def weights(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_run_writes_the_documented_workdir(tmp_path, device):
    wd = tmp_path / "run"
    s = train(tiny_config(device, plots=True, eval_every=6), wd, log=quiet)
    assert [step for step, _ in list_checkpoints(wd)] == [4, 8, 12]
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["model"]["name"] == "soft_moe_micro" and cfg["data"] == "digits" and "data_root" in cfg
    over = cfg["model"]["overrides"]
    assert cfg["img_size"] == 8 and over["in_chans"] == 1 and over["num_classes"] == 10 and over["img_size"] == 8
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert kinds == {"train", "eval", "routing"}
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [6, 12]
    routing = [r for r in records if r["kind"] == "routing"]
    assert routing and any(k.endswith("combine_weights_max_mean") for k in routing[0])
    assert {"loss", "lr", "images_per_s", "data_ms", "step_ms", "grad_norm"} <= set(records[1])
    assert sorted(p.name for p in (wd / "plots").iterdir()) == ["accuracy.png", "loss.png", "lr.png", "router.png"]
    assert 0 <= s["test_accuracy"] <= 1 and s["steps"] == 12
    summary = json.loads((wd / "summary.json").read_text())
    assert summary["test_accuracy"] == s["test_accuracy"]
    # the checkpoint is a save_pretrained directory plus a weights_only train state
    ckpt = latest_checkpoint(wd)
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["step"] == 12 and "optimizer" in state and "rng" in state and state["data"]["step"] == 12
    model, train_cfg = load_model(wd)
    assert train_cfg["model"]["name"] == "soft_moe_micro" and model.config.img_size == 8
    for key, value in weights(ckpt).items():
        assert torch.equal(model.state_dict()[key], value)


def test_training_learns_digits(tmp_path, device):
    """A tiny model must beat chance clearly in 60 steps (a broken loop stays near 10%)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s = train(tiny_config(device, steps=60, lr=3e-3, augment="none", checkpoint_every=0, routing_metrics_every=0),
                  tmp_path / "learn", log=quiet)
        assert torch.get_num_threads() == 2 and s["threads"] == 1  # the run's setting does not leak
    finally:
        torch.set_num_threads(before)
    assert s["test_accuracy"] > 0.5


def test_resume_is_exact_in_process(tmp_path, device):
    full = tmp_path / "full"
    train(tiny_config(device), full, log=quiet)
    part = tmp_path / "part"
    train(tiny_config(device), part, log=quiet)
    # pretend the run died after step 4: drop the later checkpoints, keep the metrics it wrote
    for step, d in list_checkpoints(part):
        if step > 4:
            shutil.rmtree(d)
    logs = []
    train(tiny_config(device), part, log=logs.append)
    assert any("resuming from" in msg and "step 4/12" in msg for msg in logs)
    a, b = weights(latest_checkpoint(full)), weights(latest_checkpoint(part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_train_state(latest_checkpoint(full)), load_train_state(latest_checkpoint(part))
    for (_ka, va), (_kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        assert all(torch.equal(va[n], vb[n]) for n in va)
    # metrics after the checkpoint were rewritten, not duplicated
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_checkpoint_async_in_one_process_saves_synchronously_and_says_so(tmp_path, device):
    """checkpoint_async is a torchrun option (DCP): a single-process run logs that it saves
    synchronously and writes the same checkpoints as without it (weights, optimizer, RNG)."""
    train(tiny_config(device, steps=8), tmp_path / "sync", log=quiet)
    logs = []
    train(tiny_config(device, steps=8, checkpoint_async=True), tmp_path / "async", log=logs.append)
    assert any("checkpoint_async applies to torchrun runs" in msg and "synchronously" in msg for msg in logs)
    assert [s for s, _ in list_checkpoints(tmp_path / "async")] == [s for s, _ in list_checkpoints(tmp_path / "sync")]
    for (_, a), (_, b) in zip(list_checkpoints(tmp_path / "async"), list_checkpoints(tmp_path / "sync")):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        sa, sb = load_train_state(a), load_train_state(b)
        assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"]) and "rng_ranks" not in sa
        for va, vb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
            assert all(torch.equal(va[n], vb[n]) for n in va)


def test_resume_refuses_a_different_run(tmp_path, device):
    wd = tmp_path / "r"
    train(tiny_config(device, steps=4), wd, log=quiet)
    with pytest.raises(ValueError, match=r"different run \(lr: 0.001 -> 0.002\)"):
        train(tiny_config(device, steps=4, lr=2e-3), wd, log=quiet)
    train(tiny_config(device, steps=4, log_every=1), wd, log=quiet)  # logging changes are fine
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        train(tiny_config(device), tmp_path / "empty", resume=True, log=quiet)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, device):
    real = trainer_mod.classification_loss
    calls = {"n": 0}

    def poisoned(logits, labels, kind, label_smoothing=0.0):
        calls["n"] += 1
        loss = real(logits, labels, kind, label_smoothing)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(trainer_mod, "classification_loss", poisoned)
    wd = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: the loss is nan.*step_00000004"):
        train(tiny_config(device), wd, log=quiet)
    assert [s for s, _ in list_checkpoints(wd)] == [4]
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    # found at step 8 (the next log line) without a sync per step, reported for step 7; nothing after it
    assert records[-1]["kind"] == "diverged" and records[-1]["step"] == 7 and math.isnan(records[-1]["loss"])
    assert records[-1]["lr"] == trainer_mod.make_schedule(tiny_config(device), 12)(6)
    assert [r["step"] for r in records[:-1]] == [1, 2, 3, 4, 6, 6]  # routing 1, 3, 6; train 2, 4, 6


def test_absurd_learning_rate_diverges(tmp_path, device):
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        train(tiny_config(device, lr=1e30, warmup_steps=0, grad_clip=0.0, schedule="constant", steps=50,
                          checkpoint_every=0), tmp_path / "big", log=quiet)
    assert latest_checkpoint(tmp_path / "big") is None


def test_bad_input_fails_before_writing(tmp_path, device):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="work directory .* is not writable"):
        train(tiny_config(device), blocker / "run", log=quiet)
    assert blocker.read_text() == "x"
    with pytest.raises(ValueError, match="batch_size=5000 is larger than the 'digits' train split"):
        train(tiny_config(device, batch_size=5000), tmp_path / "b", log=quiet)
    with pytest.raises(ValueError, match="unknown model name 'soft_moe_mirco'"):
        train(tiny_config(device, model="soft_moe_mirco"), tmp_path / "m", log=quiet)
    with pytest.raises(ValueError, match="unknown dataset 'digit'"):
        train(tiny_config(device, data="digit"), tmp_path / "d", log=quiet)
    with pytest.raises(ValueError, match="model.in_chans=3 disagrees with the dataset"):
        train(tiny_config(device, model=ModelConfig("soft_moe_micro", {**TINY_MODEL, "in_chans": 3})), tmp_path / "c",
              log=quiet)
    with pytest.raises(ValueError, match="warmup_steps=50 must be smaller than the run's 12 steps"):
        train(tiny_config(device, warmup_steps=50), tmp_path / "w", log=quiet)
    for name in ("b", "m", "d", "c", "w"):
        assert not (tmp_path / name).exists()


def test_read_only_workdir(tmp_path, device):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            train(tiny_config(device), ro, log=quiet)
    finally:
        ro.chmod(0o700)


def test_cli_train_and_errors(tmp_path, capsys, device):
    from softmoe.cli import main

    wd = tmp_path / "cli"
    code = main(["train", "--config", "debug", "--set", "steps=4", "--set", "checkpoint_every=2",
                 "--set", "model.depth=2", "--set", "model.moe.num_experts=4", "--set", "plots=false",
                 "--set", f"device={device}",
                 "--workdir", str(wd), "--no-progress"])
    assert code == 0 and latest_checkpoint(wd).name == "step_00000004"
    saved = json.loads((wd / "config.json").read_text())
    assert saved["workdir"] == str(wd) and saved["model"]["overrides"]["moe"] == {"num_experts": 4}
    assert "test accuracy" in capsys.readouterr().out
    assert main(["train", "--config", "debug", "--set", "lrr=1", "--workdir", str(tmp_path / "x")]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["train", "--config", "debug", "--set", "steps=ten", "--workdir", str(tmp_path / "x")]) == 2
    assert "expected int" in capsys.readouterr().err
    assert main(["train", "--config", "debug", "--resume", "--workdir", str(tmp_path / "x")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["train", "--config", "debug", "--set", "data=nope", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "nope"


def test_epochs_bf16_sigmoid_and_inception_options(tmp_path, device):
    """The other config paths run: epochs instead of steps, bf16 autocast (on the device under test),
    sigmoid loss with label smoothing, inception crop at a larger img_size, rsqrt + cooldown,
    a separate head decay."""
    s = train(tiny_config(device, steps=0, epochs=0.5, bf16=True, loss="sigmoid", label_smoothing=0.1,
                          augment="inception_crop", img_size=12, schedule="rsqrt", cooldown_steps=5,
                          head_weight_decay=3.0, checkpoint_every=0), tmp_path / "e", log=quiet)
    assert s["steps"] == 22  # ceil(0.5 * (1438 // 32 = 44))
    assert s["bf16"] is True and 0 <= s["test_accuracy"] <= 1
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg["model"]["overrides"]["img_size"] == 12
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    assert lrs[-1] < lrs[-3]  # linear cooldown to zero at the end


def test_classification_losses_match_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    p = torch.softmax(logits, -1)
    ce = -(p[0, 0].log() + p[1, 2].log()) / 2
    assert torch.allclose(trainer_mod.classification_loss(logits, labels, "softmax"), ce, atol=1e-12)
    s = torch.sigmoid(logits)
    t = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]], dtype=torch.float64)
    bce = -(t * s.log() + (1 - t) * (1 - s).log()).sum(-1).mean()
    assert torch.allclose(trainer_mod.classification_loss(logits, labels, "sigmoid"), bce, atol=1e-12)
    ts = t * 0.9 + 0.1 / 3
    bce_s = -(ts * s.log() + (1 - ts) * (1 - s).log()).sum(-1).mean()
    assert torch.allclose(trainer_mod.classification_loss(logits, labels, "sigmoid", 0.1), bce_s, atol=1e-12)


def test_train_on_image_folder_with_resize(tmp_path, monkeypatch, device):
    """An ImageFolder of RGB PNGs of mixed sizes, resized to 8x8 while decoding."""
    import numpy as np
    from PIL import Image

    monkeypatch.setenv("SOFTMOE_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(20):
                side = 8 + i % 3
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    s = train(tiny_config(device, data=str(tmp_path / "imgs"), data_image_size=8, test_split="val", steps=3,
                          batch_size=16), tmp_path / "run", log=quiet)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["overrides"]["in_chans"] == 3 and cfg["model"]["overrides"]["num_classes"] == 2
    assert s["steps"] == 3 and 0 <= s["test_accuracy"] <= 1


def _old_format(workdir, step):
    """Rewrite `workdir` as softmoe wrote it before the typed model sections: config.json and the
    checkpoint's train_config.json with "model": NAME + flat "model_kwargs", the checkpoint's
    model config.json in format_version 1 with flat moe_type / num_experts / moe_kwargs keys."""
    new = json.loads((workdir / "config.json").read_text())
    over = dict(new["model"]["overrides"])
    moe = over.pop("moe")
    old = {**new, "model": new["model"]["name"], "model_kwargs": {**over, "num_experts": moe["num_experts"]}}
    (workdir / "config.json").write_text(json.dumps(old))
    ckpt = workdir / "checkpoints" / f"step_{step:08d}"
    (ckpt / "train_config.json").write_text(json.dumps(old))
    vit = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 2,
           "num_heads": 2, "mlp_dim": 64, "qkv_bias": True, "qk_norm": True, "pool": "gap", "layer_norm_eps": 1e-06,
           "moe_type": "SoftMoE", "num_experts": 4, "moe_placement": "last_half", "moe_kwargs": {},
           "name": "soft_moe_micro"}
    (ckpt / "config.json").write_text(json.dumps({"format": "softmoe", "format_version": 1, "architecture": "vit",
                                                  "config": vit}))


def test_old_format_workdir_resumes_exactly(tmp_path, device):
    full = tmp_path / "full"
    train(tiny_config(device), full, log=quiet)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for step, d in list_checkpoints(part):  # as if the run died after step 4
        if step > 4:
            shutil.rmtree(d)
    (part / "config.json").write_text((full / "config.json").read_text().replace(str(full), str(part)))
    _old_format(part, 4)
    model, train_cfg = load_model(part)  # evaluation reads the old layout too
    assert train_cfg["model"] == "soft_moe_micro" and model.config.moe.num_experts == 4
    logs = []
    train(tiny_config(device), part, log=logs.append)
    assert any("resuming from" in msg and "step 4/12" in msg for msg in logs)
    a, b = weights(latest_checkpoint(full)), weights(latest_checkpoint(part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part / "config.json").read_text())["model"]["name"] == "soft_moe_micro"  # rewritten new
    with pytest.raises(ValueError, match=r"different run \(model: .*'num_experts': 4.* -> .*'num_experts': 2"):
        train(tiny_config(device, model=ModelConfig("soft_moe_micro", {**TINY_MODEL, "moe": {"num_experts": 2}})), part,
              log=quiet)


def _metrics(workdir):
    timing = {"images_per_s", "data_ms", "step_ms"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_aux_loss_as_none_or_zero_tensor_gives_the_same_run(tmp_path, monkeypatch, device):
    """softmoe.collect_aux_loss may return a 0-dim zero instead of None when no layer has an
    auxiliary loss: the run (metrics, weights) must not change, and no aux_loss is logged."""
    train(tiny_config(device), tmp_path / "none", log=quiet)
    real = trainer_mod.collect_aux_loss
    monkeypatch.setattr(trainer_mod, "collect_aux_loss", lambda m: torch.zeros(()) if real(m) is None else real(m))
    train(tiny_config(device), tmp_path / "zero", log=quiet)
    assert _metrics(tmp_path / "none") == _metrics(tmp_path / "zero")
    assert not any("aux_loss" in r for r in _metrics(tmp_path / "zero"))
    a, b = weights(latest_checkpoint(tmp_path / "none")), weights(latest_checkpoint(tmp_path / "zero"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokens_choice_aux_loss_is_logged_and_trained(tmp_path, device):
    tc = dict(model=ModelConfig("tc_moe_micro", TINY_MODEL), steps=4, checkpoint_every=0, routing_metrics_every=0)
    train(tiny_config(device, **tc), tmp_path / "w1", log=quiet)
    train(tiny_config(device, **tc, aux_loss_weight=0.0), tmp_path / "w0", log=quiet)
    records = [r for r in _metrics(tmp_path / "w1") if r["kind"] == "train"]
    assert all(r["aux_loss"] > 0 for r in records)
    a, b = weights(latest_checkpoint(tmp_path / "w1")), weights(latest_checkpoint(tmp_path / "w0"))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the aux loss reaches the gradient


def test_window_totals_stay_on_the_device_and_match_host_sums():
    """The window's loss mean is bitwise the mean of the per-step floats (float64 sum on the
    device, in step order), so metrics.jsonl is unchanged by keeping the sums on the device."""
    tally = trainer_mod._Tally(torch.device("cpu"))
    losses = torch.rand(7, dtype=torch.float32) * 3
    for i, loss in enumerate(losses):
        tally.add(trainer_mod._StepResult(loss, torch.tensor(0.5), torch.tensor(i), 8, None))
    assert isinstance(tally.win_loss, torch.Tensor) and isinstance(tally.win_correct, torch.Tensor)
    host = 0.0
    for loss in losses:
        host += float(loss)
    rec = tally.train_record(7, 0, 1e-3)
    assert rec["loss"] == host / 7 and rec["accuracy"] == sum(range(7)) / 56 and "aux_loss" not in rec
    tally.reset_window()
    assert float(tally.win_loss) == 0 and tally.steps == 7 and tally.images == 56


def test_val_split_evaluates_val_during_training_and_test_once(tmp_path, device):
    from softmoe.train.logs import read_metrics

    s = train(tiny_config(device, steps=8, eval_every=4, val_split=0.1), tmp_path / "r", progress=False,
              log=lambda m: None)
    evals = [m for m in read_metrics(tmp_path / "r") if m["kind"] == "eval"]
    assert [("val_accuracy" in m, "test_accuracy" in m) for m in evals] == [(True, False), (True, True)]
    from softmoe.data import load_dataset, stratified_split

    assert evals[-1]["val_examples"] == len(stratified_split(load_dataset("digits", "train").labels, 0.1)[1])
    assert s["val_accuracy"] == evals[-1]["val_accuracy"] and s["test_accuracy"] == evals[-1]["test_accuracy"]
    # routing diagnostics at every evaluation: the final one's scale is the saved model's
    from softmoe.layers import moe_layers

    model = load_model(tmp_path / "r")[0]
    layer, = [n for n, _ in moe_layers(model)]
    assert evals[-1][f"router/{layer}/scale"] == float(model.get_submodule(layer).router.scale)
    assert all(0 < m[f"router/{layer}/dispatch_entropy"] <= 1 + 1e-9 for m in evals)
    with pytest.raises(ValueError, match="val_split"):
        tiny_config(device, val_split=1.0).validate()
    with pytest.raises(ValueError, match="test_split='val'"):
        tiny_config(device, val_split=0.1, test_split="val").validate()
