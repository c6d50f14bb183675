"""The compiled small-M expert matmuls (`softmoe.kernels`) against float64 torch.

Tolerance: float32 products summed over K <= 1536 terms in a different order than torch's;
the error of either is a few ulp of the largest partial sums, so results are compared relative
to the output's largest magnitude at 2e-6 (observed: 1e-7 to 8e-7; a wrong tile, tail mask or
stride gives errors of order 1).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import softmoe.kernels as K
from softmoe import SoftMoE

RTOL = 2e-6

# Skipped only for an expected reason (no AVX-512, no compiler); a build or self-test that
# fails is a test failure.
K._library()
needs_kernels = pytest.mark.skipif(K._library() is None and not K._state["failed"], reason=f"kernels {K.status()}")


@pytest.fixture
def always(monkeypatch):
    """Kernels for every size (the size thresholds only decide where they are faster)."""
    monkeypatch.setattr(K, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setitem(K._state, "enabled", True)


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def operands(E, M, K_, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in ((E, M, K_), (E, K_, N), (E, N), (E, N, K_), (E, M, N))]


# Shapes hit every tail: rows not a multiple of 8 (nn, tn) or 16 (nt), columns not a multiple
# of 16 or 48, K not a multiple of the 64-row block, one expert, more threads than experts,
# an expert count that does not divide the thread count, the largest M of each kernel.
SHAPES = [(1, 1, 1, 1), (3, 5, 17, 33), (2, 32, 384, 1536), (5, 13, 70, 49), (1, 64, 100, 96),
          (7, 1, 8, 16), (4, 48, 131, 200), (3, 17, 65, 47), (2, 33, 9, 100)]


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64(always, shape, threads):
    E, M, K_, N = shape
    a, b, bias, bt, c = operands(*shape)
    a64 = a.double()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert K.use_kernel(M, b.numel(), None, (E, M, N), a, b, bias)
        assert rel_err(K.bmm_nn(a, b, bias), torch.baddbmm(bias.double().unsqueeze(1), a64, b.double())) < RTOL
        assert rel_err(K.bmm_nn(a, b), torch.bmm(a64, b.double())) < RTOL
        assert rel_err(K.bmm_nt(a, bt), torch.bmm(a64, bt.double().transpose(1, 2))) < RTOL
        assert rel_err(K.bmm_tn(a, c), torch.bmm(a64.transpose(1, 2), c.double())) < RTOL
    finally:
        torch.set_num_threads(old)


@needs_kernels
def test_out_buffers_are_filled_and_returned(always):
    E, M, K_, N = 3, 13, 70, 53
    a, b, bias, bt, c = operands(E, M, K_, N)
    for fn, args, shape in ((K.bmm_nn, (a, b, bias), (E, M, N)), (K.bmm_nt, (a, bt), (E, M, N)),
                            (K.bmm_tn, (a, c), (E, K_, N))):
        out = torch.full(shape, float("nan"))
        got = fn(*args, out=out)
        assert got is out and torch.isfinite(out).all()
        K._state["enabled"] = False
        assert rel_err(out, fn(*args).double()) < RTOL
        K._state["enabled"] = True


@needs_kernels
def test_weight_gradient_kernel_with_unaligned_output(always):
    """The weight-gradient kernel streams its stores only into 64-byte aligned rows."""
    E, M, K_, N = 2, 8, 20, 48
    a, _, _, _, c = operands(E, M, K_, N)
    out = torch.empty(E * K_ * N + 1)[1:].view(E, K_, N)  # 4 bytes off alignment
    K.bmm_tn(a, c, out=out)
    assert rel_err(out, torch.bmm(a.double().transpose(1, 2), c.double())) < RTOL


def test_torch_path_where_the_kernels_do_not_apply(always):
    """float64, non-contiguous, autograd-tracked, a wrong-shaped `out`: torch's own result."""
    E, M, K_, N = 2, 4, 6, 5
    a, b, bias, bt, c = operands(E, M, K_, N)
    assert not K.use_kernel(M, b.numel(), None, (E, M, N), a.double(), b.double())
    assert not K.use_kernel(M, b.numel(), None, (E, M, N), a.transpose(1, 2).contiguous().transpose(1, 2), b)
    w = b.clone().requires_grad_()
    assert not K.use_kernel(M, b.numel(), None, (E, M, N), a, w)
    y = K.bmm_nn(a, w, bias)
    y.sum().backward()  # the torch path records the graph
    torch.testing.assert_close(w.grad, a.sum(1, keepdim=True).transpose(1, 2).expand(E, K_, N).contiguous())
    assert not K.use_kernel(M, b.numel(), torch.empty(1), (E, M, N), a, bt)
    assert not K.use_kernel(65, b.numel(), None, (E, K_, N), a, c)


def test_size_thresholds(monkeypatch):
    """By default the kernels take at most 64 rows per expert and at least 8 MiB of weights."""
    monkeypatch.setitem(K._state, "enabled", True)
    small = torch.empty(3, 384, 1536)  # 6.75 MiB
    large = torch.empty(4, 384, 1536)  # 9 MiB
    a = torch.empty(4, 64, 384)
    on = K._library() is not None
    assert not K.use_kernel(64, small.numel(), None, (3, 64, 1536), a[:3], small)
    assert not K.use_kernel(65, large.numel(), None, (4, 65, 1536), a, large)
    assert K.use_kernel(64, large.numel(), None, (4, 64, 1536), a, large) == on
    assert K.use_kernel(64, large.numel(), None, (4, 384, 1536), a, torch.empty(4, 64, 1536)) == on


def test_set_enabled_validates_and_switches(monkeypatch):
    monkeypatch.setitem(K._state, "enabled", None)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        K.set_enabled(1)
    K.set_enabled(False)
    assert K.status().startswith("off")
    assert not K.use_kernel(1, 1 << 30, None, (1, 1, 1), torch.empty(1, 1, 1), torch.empty(1, 1, 1))


def test_use_kernels_is_scoped_nestable_and_thread_local(monkeypatch):
    import threading

    monkeypatch.setitem(K._state, "enabled", True)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        with K.use_kernels("no"):
            pass
    seen = {}
    with K.use_kernels(False):
        assert K.status().startswith("off")
        with K.use_kernels(True):
            assert K._enabled()
        assert not K._enabled()  # the inner block restored the outer setting
        t = threading.Thread(target=lambda: seen.setdefault("other", K._enabled()))
        t.start()
        t.join()
    assert seen["other"] is True  # another thread keeps the process setting
    assert K._enabled()
    K.set_enabled(False)
    with K.use_kernels(True):
        assert K._enabled()  # the block wins over the process setting
    assert not K._enabled()


def test_no_kernel_for_empty_inputs(always):
    a, b = torch.randn(4, 0, 64), torch.randn(4, 64, 32)
    assert not K.use_kernel(0, b.numel(), None, (4, 0, 32), a, b)
    assert K.bmm_nn(a, b).shape == (4, 0, 32) and K.bmm_tn(a, torch.randn(4, 0, 32)).abs().sum() == 0


@needs_kernels
@pytest.mark.parametrize("mask", [False, True])
def test_soft_moe_step_with_and_without_kernels(always, mask):
    """A whole SoftMoE training step: outputs and every gradient agree with the torch path."""
    torch.manual_seed(0)
    layer = SoftMoE(48, 6, slots_per_expert=2, hidden_dim=80)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x0 = torch.randn(5, 11, 48)
    m = torch.rand(5, 11) > 0.3 if mask else None
    dy = torch.randn(5, 11, 48)
    results = []
    for enabled in (True, False):
        with K.use_kernels(enabled):
            for _ in range(2):  # the second step reuses the pooled buffers
                layer.zero_grad(set_to_none=True)
                x = x0.clone().requires_grad_()
                y = layer(x, m)
                y.backward(dy)
            with torch.no_grad():
                y_eval = layer(x0, m)
        results.append([y.detach(), y_eval, x.grad] + [p.grad.clone() for p in layer.parameters()])
    for got, want in zip(*results):
        assert rel_err(got, want.double()) < 1e-5  # float32 routing on top: a few ulp more


def test_failed_build_falls_back_to_torch(tmp_path):
    """A compiler that fails: one warning, then torch ops give the right result."""
    code = textwrap.dedent("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import softmoe.kernels as K
        K.MIN_WEIGHT_BYTES = 0
        a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
        torch.testing.assert_close(K.bmm_nn(a, b), torch.bmm(a, b))
        print("STATUS", K.status())
    """)
    env = dict(os.environ, CXX="false", SOFTMOE_KERNEL_DIR=str(tmp_path), SOFTMOE_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert "STATUS unavailable: RuntimeError: false" in done.stdout
        assert done.stderr.count("WARNING softmoe.kernels: compiled kernels failed") == 1
        assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))  # nothing half-written
    else:
        assert "STATUS unavailable: CPU capability" in done.stdout


def test_environment_switch_turns_kernels_off():
    code = "import softmoe.kernels as K; print(K.status())"
    env = dict(os.environ, SOFTMOE_KERNELS="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.startswith("off"), done.stdout + done.stderr


@needs_kernels
@pytest.mark.parametrize("group_bytes", [None, 2 * 7 * 40 * 4])  # all experts at once; 2 at a time (last 1)
def test_expert_inference_in_groups(always, group_bytes, monkeypatch):
    """The no-graph forward writes each group's output into slices of one buffer."""
    import softmoe.layers.fused.experts as fused_experts
    from softmoe.layers.experts import Experts

    if group_bytes is not None:
        monkeypatch.setattr(fused_experts, "INFERENCE_HIDDEN_BYTES", group_bytes)
    ex = Experts(5, 24, 40, expert_init="distinct")
    x = torch.randn(5, 7, 24)
    with torch.no_grad():
        got = ex(x)
    want = torch.baddbmm(ex.b1.double().unsqueeze(1), x.double(), ex.w1.double())
    want = torch.baddbmm(ex.b2.double().unsqueeze(1), torch.nn.functional.gelu(want, approximate="tanh"),
                         ex.w2.double())
    assert rel_err(got, want) < 1e-5


@needs_kernels
def test_tokens_choice_step_with_and_without_kernels(always):
    """The sparse layers share the experts (capacity rows per expert): same outputs and grads."""
    from softmoe import TokensChoiceMoE

    torch.manual_seed(0)
    layer = TokensChoiceMoE(32, 4, k=2, hidden_dim=48)
    x0, dy = torch.randn(3, 10, 32), torch.randn(3, 10, 32)
    results = []
    for enabled in (True, False):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        torch.manual_seed(5)  # the same gate noise in both runs
        with K.use_kernels(enabled):
            layer(x).backward(dy)
        results.append([x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    for got, want in zip(*results):
        assert rel_err(got, want.double()) < 1e-5


@needs_kernels
def test_unwritable_cache_builds_in_a_private_folder(tmp_path):
    """A cache folder that cannot be created: the build goes to a temporary folder, kernels on."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = textwrap.dedent("""
        import torch, softmoe.kernels as K
        K.MIN_WEIGHT_BYTES = 0
        a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
        torch.testing.assert_close(K.bmm_nn(a, b), torch.bmm(a, b))
        print(K.status())
    """)
    env = dict(os.environ, SOFTMOE_KERNEL_DIR=str(blocker / "kernels"), SOFTMOE_KERNELS="1", TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("on (") and "softmoe-kernels-" in done.stdout, done.stdout + done.stderr
    assert not list(tmp_path.glob("softmoe-kernels-*"))  # the private build is removed once loaded
