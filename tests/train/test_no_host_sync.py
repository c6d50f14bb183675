"""A training step never syncs the host with the device (issue 16 item 3), proved by
construction on any device: inside the step (batch, forward, backward, clip, update, the
divergence guard's bookkeeping, Tokens Choice routing metrics recorded) every tensor-to-host
read raises, and no op mixes a CPU-created tensor with device tensors (that would be a
blocking host-to-device copy). On CUDA the step also runs under
torch.cuda.set_sync_debug_mode("error")."""
import contextlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from softmoe.layers import collect_metrics, moe_layers
from softmoe.train import trainer as trainer_mod
from softmoe.train.config import ModelConfig

from train_helpers import TINY_MODEL, tiny_config

_OPTIM_DIR = os.path.join(os.path.dirname(torch.__file__), "optim")
_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class HostSyncError(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Every Tensor.item / tolist / bool / float / int / index raises, except those of torch.optim
    on its step counters (host tensors by design in torch: `state["step"]` stays on the CPU)."""
    with monkeypatch.context() as m:
        for name in _READS:
            original = getattr(torch.Tensor, name)

            def read(self, *args, _name=name, _original=original, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(_OPTIM_DIR) and self.device.type == "cpu" and self.dim() == 0:
                    return _original(self, *args, **kwargs)
                raise HostSyncError(f"Tensor.{_name} in a training step (called from {caller})")

            m.setattr(torch.Tensor, name, read)
        yield


class MixedDevices(TorchDispatchMode):
    """Records every op whose tensor arguments live on more than one device (0-dim CPU scalars
    excepted: torch passes them by value) and every copy of a CPU tensor to a non-CPU device
    from pageable (non-pinned) memory."""

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            self.bad.append(f"{func}: {sorted(map(str, devices))}")
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and tensors:
            src = tensors[-1] if func is torch.ops.aten.copy_.default else tensors[0]
            target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else tensors[0].device
            if (src.device.type == "cpu" and target is not None and torch.device(target).type != "cpu"
                    and not src.is_pinned()):
                self.bad.append(f"{func}: pageable host-to-device copy of {tuple(src.shape)}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("augment,micro,checkpointing", [("crop_flip", 0, "none"), ("inception_crop", 0, "none"),
                                                        ("crop_flip", 8, "full")])
def test_a_training_step_reads_nothing_back(tmp_path, monkeypatch, device, augment, micro, checkpointing):
    """micro 8: gradient accumulation over 4 micro-batches (noise served per micro-batch), with
    activation checkpointing: still no read."""
    cfg = tiny_config(model=ModelConfig("tc_moe_micro", dict(TINY_MODEL)), augment=augment, device=str(device),
                      bf16=False, steps=4, checkpoint_every=0, micro_batch_size=micro,
                      activation_checkpoint=checkpointing)
    with contextlib.ExitStack() as held:
        run = trainer_mod._setup_run(cfg, tmp_path / "w", None, lambda *a, **k: None, held)
        tally = trainer_mod._Tally(run.device)
        guard = trainer_mod._DivergenceGuard(run.device)
        clock = trainer_mod.StepClock(run.device)

        def step(s):
            clock.start()
            x, y = run.loader.batch(s)
            clock.data_done()
            out = trainer_mod._train_step(run, x, y, run.schedule(s), routing=True)
            guard.update(s + 1, out)
            clock.step_done()
            tally.add(out)

        step(0)  # the first step may allocate and lay out state (optimizer moments, buffer pools)
        mixed = MixedDevices()
        sync_debug = device.type == "cuda"
        if sync_debug:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            with no_host_reads(monkeypatch), mixed:
                step(1)
                step(2)
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
        assert mixed.bad == []
        guard.check(run, None)  # the reads happen here, once, outside the step
        data_s, step_s, n = clock.collect()
        assert n == 3 and data_s > 0 and step_s > 0
        expected = {f"{name}/{k}": float(v) for name, m in moe_layers(run.model) for k, v in m.metrics.items()}
        calls = []
        original = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(tuple(t.shape)) or original(t))
        metrics = collect_metrics(run.model)
        assert calls == [(len(expected),)]  # one transfer for every layer's metrics (was one float() each)
        assert len(expected) >= 5 and metrics == expected  # float32 values through float64: exact


def test_the_harness_catches_reads_and_mixed_devices(monkeypatch):
    """The checks above can fail: each kind of host read raises under no_host_reads, and a
    CPU tensor meeting a meta tensor (standing in for a device) is recorded."""
    t = torch.ones(2)
    with no_host_reads(monkeypatch):
        for read in (lambda: t[0].item(), t.tolist, lambda: bool(t[0]), lambda: float(t[0]), lambda: int(t[0]),
                     lambda: [0, 1, 2][t[0].long()]):
            with pytest.raises(HostSyncError):
                read()
    mixed = MixedDevices()
    with mixed:
        torch.ones(3, device="meta")[torch.tensor([0, 1])]  # a CPU index into a device tensor
        torch.arange(3).to("meta")  # a pageable host-to-device copy
    assert len(mixed.bad) == 2, mixed.bad
