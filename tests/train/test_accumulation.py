"""Gradient accumulation (`micro_batch_size`), activation checkpointing (`activation_checkpoint`)
and per-block compile (`compile`) in the trainer's step, single process (docs/distributed.md
"Gradient accumulation, activation checkpointing, compile"). The torchrun cases are in
tests/train/test_distributed_train.py."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softmoe.distributed import MicroBatchNoise, key_noise_by_global_rows, select_micro_batch
from softmoe.layers import TokensChoiceMoE
from softmoe.train import TrainConfig, train
from softmoe.train import trainer as trainer_mod
from softmoe.train.blocks import apply_activation_checkpointing, compile_blocks
from softmoe.train.config import ModelConfig

from train_helpers import TINY_MODEL, tiny_config

ROOT = Path(__file__).resolve().parents[2]
DENSE = {k: v for k, v in TINY_MODEL.items() if k != "moe"}
MODELS = {"soft_moe_micro": ModelConfig("soft_moe_micro", dict(TINY_MODEL)),
          "vit_micro": ModelConfig("vit_micro", dict(DENSE)),
          # noisy Tokens Choice (the sparse gates' default noise_std 1.0), routing groups of 2 sequences
          "tc_noisy": ModelConfig("tc_moe_micro", {**TINY_MODEL, "moe": {"num_experts": 4, "group_size": 2}}),
          "ec_noisy": ModelConfig("ec_moe_micro", {**TINY_MODEL, "moe": {"num_experts": 4, "group_size": 2}})}
# float32, 2 AdamW steps: the micro-batches change only the order of the float32 sums (a mean of
# 2 or 4 micro-batch means instead of one mean over 32 rows, gradients accumulated in .grad), so
# gradients and weights agree to a few float32 ulps of their size (measured up to ~3e-8 on the
# weights); 1e-6 leaves room for other BLAS blockings and still fails at any missed 1/k (1e-3).
TOL = 1e-6


def _quiet(*args, **kwargs):
    pass


def _steps(cfg: TrainConfig, workdir: Path, steps: int = 2) -> tuple[dict, dict, list]:
    """(gradients after step 1 (clipped, as the update used them), weights after `steps`, the
    step results) of the trainer's own step on its own batches."""
    with contextlib.ExitStack() as held:
        run = trainer_mod._setup_run(cfg, workdir, None, _quiet, held)
        out, grads = [], None
        for s in range(steps):
            x, y = run.loader.batch(s)
            out.append(trainer_mod._train_step(run, x, y, run.schedule(s), routing=False))
            if s == 0:
                grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters() if p.grad is not None}
        weights = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        return grads, weights, out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each model's two steps on the global batch of 32, no accumulation, no checkpointing."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _steps(tiny_config(model=MODELS[name]), tmp_path_factory.mktemp(f"ref-{name}"))
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["soft_moe_micro", "vit_micro", "tc_noisy", "ec_noisy"])
@pytest.mark.parametrize("micro", [32, 16, 8])  # k = 1, 2, 4
def test_accumulation_equals_one_step_on_the_global_batch(references, tmp_path, name, micro):
    ref_grads, ref_weights, ref_out = references(name)
    grads, weights, out = _steps(tiny_config(model=MODELS[name], micro_batch_size=micro), tmp_path)
    assert _max_diff(grads, ref_grads) < TOL
    diff = _max_diff(weights, ref_weights)
    assert diff < TOL, diff
    assert max(p.abs().max().item() for p in ref_grads.values()) > 1e-3  # the gradients are not all ~0
    for a, b in zip(out, ref_out):  # the logged values are the whole batch's
        assert a.images == b.images == 32
        assert int(a.correct) == int(b.correct)
        assert abs(float(a.loss) - float(b.loss)) < 1e-6  # a mean of k means vs one mean, float32
        assert (a.aux is None) == (b.aux is None) == (name != "tc_noisy")
        if a.aux is not None:
            assert abs(float(a.aux) - float(b.aux)) < 1e-7  # per-group terms: the mean of k group means
        assert abs(float(a.grad_norm) - float(b.grad_norm)) < 1e-5


def test_a_missing_division_by_k_is_caught(references, tmp_path, monkeypatch):
    """The comparison above can fail: summing the micro-batch losses (no 1/k) is far off."""
    ref_grads, _, _ = references("vit_micro")
    original = trainer_mod._forward_backward
    monkeypatch.setattr(trainer_mod, "_forward_backward", lambda run, x, y, k, routing: original(run, x, y, 1, routing))
    grads, _, _ = _steps(tiny_config(model=MODELS["vit_micro"], micro_batch_size=8, grad_clip=0.0), tmp_path,
                         steps=1)
    assert _max_diff(grads, ref_grads) > 1e-3


def test_noise_of_each_micro_batch_is_its_rows_of_the_one_process_draw():
    """MicroBatchNoise: k micro-batches get, in order, the rows of the single `torch.randn` draw
    of the whole batch, the RNG ends where that draw leaves it, a recompute inside a backward
    gets the same rows, and a forgotten select is an error (never repeated noise)."""
    layer = TokensChoiceMoE(8, 4, 16, group_size=2)
    torch.manual_seed(3)
    expected = torch.randn(8, 2 * 5, 4)  # 16 sequences of 5 tokens, groups of 2: (8, 10, 4)
    after = torch.get_rng_state()
    key_noise_by_global_rows(layer, (0, 16), 16, micro_batches=4)
    assert isinstance(layer.noise_sampler, MicroBatchNoise)
    torch.manual_seed(3)
    for i in range(4):
        select_micro_batch(layer, i)
        got = layer.noise_sampler((2, 10, 4), torch.float32, torch.device("cpu"), 2)
        assert torch.equal(got, expected[2 * i:2 * i + 2])
    assert torch.equal(torch.get_rng_state(), after)
    with pytest.raises(ValueError, match="select_micro_batch"):
        layer.noise_sampler((2, 10, 4), torch.float32, torch.device("cpu"), 2)
    with pytest.raises(ValueError, match="group_size=2 must divide the micro-batch"):
        key_noise_by_global_rows(layer, (0, 12), 12, micro_batches=4)


def _checkpointed_grads(name: str, mode: str, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Gradients of one training forward/backward (loss + aux) of a fresh model, under `mode`."""
    torch.manual_seed(seed)
    model = MODELS[name].build()
    model.train()
    apply_activation_checkpointing(model, mode)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    torch.manual_seed(seed + 1)  # router noise from here
    loss = torch.nn.functional.cross_entropy(model(x), y)
    from softmoe.layers import collect_aux_loss

    loss = loss + collect_aux_loss(model)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, loss.detach()


@pytest.mark.parametrize("name", ["soft_moe_micro", "tc_noisy"])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(name, mode):
    """The recompute draws the same router noise (checkpointing restores the RNG state) and runs
    the same float32 ops on the same inputs: bitwise the gradients without checkpointing."""
    ref, ref_loss = _checkpointed_grads(name, "none")
    got, loss = _checkpointed_grads(name, mode)
    assert got.keys() == ref.keys()
    assert torch.equal(loss, ref_loss)
    for n in ref:
        assert torch.equal(got[n], ref[n]), n
    other, _ = _checkpointed_grads(name, mode, seed=5)  # the check can fail: another init differs
    assert any(not torch.equal(other[n], ref[n]) for n in ref)


def test_checkpointing_keeps_names_and_recomputes():
    """No wrapper modules (state dict names unchanged), and the recompute runs: "full" re-runs
    every block in the backward, "selective" only the attention, never the MoE layer."""
    calls = {}

    def count(tag):
        def hook(module, args):
            calls[tag] = calls.get(tag, 0) + 1
        return hook

    for mode, block_runs, moe_runs in (("none", 1, 1), ("full", 2, 2), ("selective", 1, 1)):
        torch.manual_seed(0)
        model = MODELS["soft_moe_micro"].build()
        names = list(model.state_dict())
        apply_activation_checkpointing(model, mode)
        assert list(model.state_dict()) == names
        calls.clear()
        model.blocks[-1].register_forward_pre_hook(count("block"))
        model.blocks[-1].attn.register_forward_pre_hook(count("attn"))
        model.blocks[-1].mlp.register_forward_pre_hook(count("moe"))
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        assert calls == {"block": block_runs, "attn": 1 if mode == "none" else 2, "moe": moe_runs}, mode


def test_bad_activation_checkpoint_mode():
    with pytest.raises(ValueError, match="activation_checkpoint must be one of"):
        apply_activation_checkpointing(MODELS["vit_micro"].build(), "some")
    with pytest.raises(ValueError, match="activation_checkpoint must be one of"):
        tiny_config(activation_checkpoint="some").validate()
    with pytest.raises(ValueError, match="transformer blocks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), "full")


@pytest.mark.parametrize("changes,message", [
    ({"micro_batch_size": 5}, "micro_batch_size=5 must divide batch_size=32"),
    ({"micro_batch_size": 64}, "micro_batch_size=64 must divide batch_size=32"),
    ({"micro_batch_size": -1}, "micro_batch_size must be >= 0"),
])
def test_bad_micro_batch_size(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**changes).validate()


def test_micro_batch_must_hold_whole_routing_groups(tmp_path):
    cfg = tiny_config(model=ModelConfig("tc_moe_micro", {**TINY_MODEL, "moe": {"num_experts": 4, "group_size": 4}}),
                      micro_batch_size=2)
    with pytest.raises(ValueError, match="micro_batch_size=2 must be a multiple of .*group_size=4"):
        train(cfg, tmp_path / "w")
    assert not (tmp_path / "w" / "config.json").exists()


def test_step_options_are_resumable_and_lm_rejects_them():
    from softmoe.train.config import resumable_fields

    assert {"micro_batch_size", "activation_checkpoint", "compile"} <= resumable_fields()
    with pytest.raises(ValueError, match="task='classify' only"):
        TrainConfig(task="lm", model="gpt_micro", data="pydoc", steps=1, micro_batch_size=4).validate()


def _cli(*args, timeout=300):
    p = subprocess.run([sys.executable, "-m", "softmoe", "train", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.slow
def test_cli_micro_batch_size(tmp_path):
    """`--set micro_batch_size=...` from the CLI: a bad value exits 2 naming the field; a good one
    trains, logs the whole batch's loss and accuracy, and resumes with another value."""
    common = ["--set", "model=soft_moe_micro", "--set", "model.patch_size=4", "--set", "model.depth=2",
              "--set", "model.embed_dim=32", "--set", "model.num_heads=2", "--set", "model.mlp_dim=64",
              "--set", "model.moe.num_experts=4", "--set", "batch_size=32", "--set", "num_threads=1",
              "--set", "tensorboard=false", "--set", "plots=false", "--set", "log_every=1",
              "--set", "routing_metrics_every=0", "--set", "checkpoint_every=2", "--set", "device=cpu",
              "--no-progress"]
    rc, out = _cli("--workdir", str(tmp_path / "bad"), "--set", "steps=2", "--set", "micro_batch_size=12", *common)
    assert rc == 2 and "micro_batch_size=12" in out, out[-2000:]
    rc, out = _cli("--workdir", str(tmp_path / "a"), "--set", "steps=4", *common)
    assert rc == 0, out[-3000:]
    rc, out = _cli("--workdir", str(tmp_path / "b"), "--set", "steps=4", "--set", "micro_batch_size=8", *common)
    assert rc == 0, out[-3000:]

    def records(wd):
        return [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "train"]

    for a, b in zip(records(tmp_path / "a"), records(tmp_path / "b"), strict=True):
        assert a["accuracy"] == b["accuracy"]
        assert abs(a["loss"] - b["loss"]) < 1e-6
    # resume the accumulated run at step 2 without accumulation (resumable): same result to TOL
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
    rc, out = _cli("--workdir", str(tmp_path / "b"), "--set", "steps=4", *common)
    assert rc == 0 and "resuming" in out, out[-3000:]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert _max_diff(a, b) < TOL


def _compile_works() -> str | None:
    """None when torch.compile's CPU backend (inductor + a C++ compiler) can build a kernel here."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain means: skip
        return f"torch.compile does not work here: {type(e).__name__}: {e}"[:300]
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name,mode,micro", [("soft_moe_micro", "none", 0), ("vit_micro", "full", 0),
                                             ("tc_noisy", "selective", 16)])
def test_compiled_blocks_step_equals_eager(references, tmp_path, name, mode, micro):
    """Two steps with every block compiled (with checkpointing, accumulation, router noise) equal
    eager without them: inductor fuses and reorders float32 ops, no other change (measured
    ~5e-8 on the step-1 gradients, which Adam's first step would hide: they are compared);
    router noise stays eager (GlobalRowNoise / MicroBatchNoise are compiler-disabled: inductor's
    RNG would draw other numbers, 1e-2 off). 1e-6 as above."""
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    ref_grads, ref_weights, _ = references(name)
    grads, weights, _ = _steps(tiny_config(model=MODELS[name], activation_checkpoint=mode, compile=True,
                                           micro_batch_size=micro), tmp_path)
    assert _max_diff(grads, ref_grads) < TOL
    assert _max_diff(weights, ref_weights) < TOL


def test_compile_blocks_keeps_names():
    model = MODELS["vit_micro"].build()
    names = list(model.state_dict())
    compile_blocks(model)
    assert list(model.state_dict()) == names
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.blocks)
