"""The layer benchmark's machinery on tiny shapes: the naive baseline is the same function as
SoftMoE, the FLOP count is what the layer executes, peak memory sees known allocations, the
command writes its tables (`softmoe bench` itself: tests/cli/test_cli_bench.py)."""
import csv
import importlib.util
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import softmoe.bench.layer as bench_layer
from softmoe import SoftMoE
from softmoe.bench import peak_rss_bytes, peak_rss_supported
from softmoe.bench.layer import command, impls, memory, workers
from softmoe.bench.layer.naive import NaiveSoftMoE
from softmoe.bench.layer.shape import Shape, layer_bytes, layer_flops

TINY = dict(batch=2, tokens=5, dim=8, hidden=16, slots=1)


def soft_moe64(D=6, E=3, P=2, H=5, seed=0) -> SoftMoE:
    """A float64 SoftMoE far from its init: non-uniform routing, scale 2.5, distinct experts."""
    layer = SoftMoE(D, E, slots_per_expert=P, hidden_dim=H).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        layer.router.scale.fill_(2.5)
    return layer


def tokens64(B=3, N=7, D=6, seed=1) -> torch.Tensor:
    """Tokens with norms from 0.1 to 10, so normalised and raw tokens differ."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    return x * torch.exp(torch.empty(B, N, 1, dtype=torch.float64).uniform_(math.log(0.1), math.log(10), generator=g))


# -- the naive baseline computes SoftMoE's function -----------------------------------------
def test_naive_matches_soft_moe_outputs_and_grads_float64():
    layer = soft_moe64()
    naive = NaiveSoftMoE.from_soft_moe(layer)
    x1, x2 = tokens64().requires_grad_(), tokens64().requires_grad_()
    dy = torch.randn(3, 7, 6, dtype=torch.float64)
    y1, y2 = layer(x1), naive(x2)
    # 1e-12 relative: the same float64 math in a different summation order.
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12 * y1.abs().max().item())
    y1.backward(dy)
    y2.backward(dy)
    ex = layer.experts
    pairs = [(x2.grad, x1.grad), (naive.phi.grad, layer.router.phi.grad), (naive.scale.grad, layer.router.scale.grad)]
    for e, mlp in enumerate(naive.experts):
        pairs += [(mlp[0].weight.grad.T, ex.w1.grad[e]), (mlp[0].bias.grad, ex.b1.grad[e]),
                  (mlp[2].weight.grad.T, ex.w2.grad[e]), (mlp[2].bias.grad, ex.b2.grad[e])]
    for got, want in pairs:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_naive_differs_without_the_scale():
    # The comparison above can fail: a naive layer that ignored `scale` would be far off.
    layer = soft_moe64()
    naive = NaiveSoftMoE.from_soft_moe(layer)
    with torch.no_grad():
        naive.scale.fill_(1.0)
    x = tokens64()
    assert (naive(x) - layer(x)).abs().max() > 1e-3 * layer(x).abs().max()


def test_naive_has_softmoe_parameter_count():
    layer = SoftMoE(8, 4, slots_per_expert=2, hidden_dim=16)
    naive = NaiveSoftMoE(8, 4, 2, 16)
    assert impls.param_count(naive) == impls.param_count(layer)


# -- FLOPs ------------------------------------------------------------------------------------
def test_layer_flops_by_hand():
    s = Shape(batch=2, tokens=3, dim=4, experts=5, slots=1, hidden=6)
    # logits, dispatch, combine: 2*B*N*D*S = 240 each; experts: 2 matmuls * 2*B*S*D*H = 960.
    assert layer_flops(s) == 3 * 240 + 960


@pytest.mark.parametrize("P", [1, 3])
def test_layer_flops_is_what_the_layers_execute(P):
    s = Shape(batch=2, tokens=5, dim=8, experts=4, slots=P, hidden=16)
    layer = SoftMoE(8, 4, slots_per_expert=P, hidden_dim=16)
    x = torch.randn(2, 5, 8, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    assert fc.get_total_flops() == layer_flops(s)
    # Forward+backward = 3x forward, counted on the naive layer (plain autograd ops only).
    naive = NaiveSoftMoE(8, 4, P, 16)
    with FlopCounterMode(display=False) as fc:
        naive(x).backward(torch.randn(2, 5, 8))
    assert fc.get_total_flops() == 3 * layer_flops(s)


# -- the implementations ------------------------------------------------------------------------
@pytest.mark.parametrize("name", [i.name for i in impls.IMPLS])
def test_every_implementation_builds_at_the_shape_and_trains(name):
    impl = impls.get_impl(name)
    if impl.module is not None and importlib.util.find_spec(impl.module) is None:
        pytest.skip(f"{name} is not installed")
    s = Shape(experts=4, **TINY)
    model = impls.build(name, s)
    n_expert = 2 * s.dim * s.hidden + s.hidden + s.dim
    # Same experts everywhere; the routers differ only by a few D-sized vectors.
    assert s.experts * n_expert <= impls.param_count(model) <= s.experts * n_expert + s.dim * (s.experts + 3) + 1
    x, dy = impls.make_inputs(s)
    assert impls.forward_no_grad(model, x).shape == x.shape
    impls.train_step(model, x, dy)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_unknown_implementation_is_a_value_error():
    with pytest.raises(ValueError, match="implementation must be one of"):
        impls.build("nope", Shape(experts=2, **TINY))


# -- peak memory --------------------------------------------------------------------------------
needs_proc = pytest.mark.skipif(not peak_rss_supported(), reason="needs Linux /proc/self/clear_refs")


@needs_proc
def test_peak_rss_sees_a_known_allocation():
    n = 64 << 20  # 64 MiB: above glibc's mmap threshold, so freshly mapped and touched
    peak = peak_rss_bytes(lambda: torch.ones(n // 4))
    # +-: the baseline RSS moves by a few pages of unrelated memory (freed buffers, page tables).
    assert n - (1 << 20) <= peak <= n + (8 << 20)
    assert peak_rss_bytes(lambda: None) < (4 << 20)


@needs_proc
def test_memory_probe_counts_the_fresh_weight_grads():
    s = Shape(batch=2, tokens=5, dim=64, experts=32, slots=1, hidden=256)
    grads = 4 * 2 * s.experts * s.dim * s.hidden  # 8 MiB of w1/w2 gradients, new every step
    mem = memory.measure_memory("softmoe", s, threads=1, timeout=120)
    assert grads - (1 << 20) <= mem["fwdbwd_peak_bytes"] <= 2 * grads
    assert mem["fwd_peak_bytes"] < grads / 4  # inference holds no grads and tiny activations


# -- the command ---------------------------------------------------------------------------
def test_quick_command_writes_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(command, "S16", dict(TINY, batch=8))
    monkeypatch.setattr(command, "QUICK_BATCH", 2)
    monkeypatch.setattr(command, "QUICK_EXPERTS", (2, 4))
    monkeypatch.setattr(command, "matmul_gflops", lambda **kw: 10.0)  # skip the 2048^3 matmul
    monkeypatch.setattr(command, "triad_gbs", lambda mib: 0.02)  # and the 768 MiB triad
    n_before = torch.get_num_threads()
    try:
        rc = bench_layer.main(["--quick", "--threads", "1", "--repeats", "1", "--no-memory", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n_before)
    assert rc == 0
    out = capsys.readouterr().out
    assert "torch.set_num_threads(1)" in out
    rows = list(csv.DictReader(open(tmp_path / "layer.csv")))
    names = [i.name for i in impls.available_impls()]
    assert [(r["E"], r["implementation"]) for r in rows] == [(str(E), n) for E in (2, 4) for n in names]
    fl = {E: layer_flops(Shape(experts=E, **dict(TINY, batch=2))) for E in (2, 4)}
    for r in rows:
        ms = float(r["fwdbwd_ms"])
        assert ms > 0 and float(r["fwd_ms"]) > 0
        assert float(r["fwdbwd_GFLOPs"]) == pytest.approx(3 * fl[int(r["E"])] / ms / 1e6, rel=1e-9)
        assert float(r["fwdbwd_frac_mm"]) == pytest.approx(float(r["fwdbwd_GFLOPs"]) / 10.0, rel=1e-9)
        assert r["fwd_peak_MB"] == ""  # --no-memory
        # the CPU roofline from this run's measurements: 10 GFLOP/s and 0.02 GB/s
        s = Shape(experts=int(r["E"]), **dict(TINY, batch=2))
        roof_flops, roof_bytes = layer_flops(s) / 10e9, layer_bytes(s) / 0.02e9
        assert float(r["fwdbwd_roofline"]) == pytest.approx(3 * max(roof_flops, roof_bytes) / (ms / 1e3), rel=1e-6)
        assert r["bound"] == ("memory" if roof_bytes > roof_flops else "compute")
        if r["implementation"] == "softmoe":
            assert float(r["fwdbwd_vs_softmoe"]) == 1.0
    md = open(tmp_path / "layer.md").read()
    assert "set_num_threads(1)" in md and "Peak memory: not measured." in md
    assert "measured in this run: the large-matmul rate and a STREAM triad" in md
    assert "CPU roofline: 0.01 TFLOP/s, 0.0 GB/s" in out


def test_triad_bandwidth_is_positive_and_checks_its_argument():
    from softmoe.bench import triad_gbs

    assert triad_gbs(mib=4, repeats=2) > 0
    with pytest.raises(ValueError, match="mib must be >= 1"):
        triad_gbs(mib=0)


def test_given_cpu_peaks_are_not_measured(monkeypatch):
    """Only what --peak-tflops / --peak-gbs leave out is measured."""
    monkeypatch.setattr(command, "triad_gbs", lambda mib: pytest.fail("measured a given bandwidth"))
    assert command.cpu_peaks(100.0, 0.5, 20.0)[:2] == (0.5, 20.0)
    monkeypatch.setattr(command, "triad_gbs", lambda mib: 7.0)
    tflops, gbs, source = command.cpu_peaks(100.0, None, None)
    assert (tflops, gbs) == (0.1, 7.0) and "large-matmul rate and a STREAM triad" in source


@pytest.mark.parametrize("argv, match", [(["--threads", "0"], "--threads"), (["--repeats", "0"], "--repeats"),
                                         (["--experts", "0"], "--experts"), (["--processes", "0"], "--processes")])
def test_bad_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        bench_layer.main(argv + ["--out", str(tmp_path)])


@pytest.mark.parametrize("same_process", [False, True])
def test_time_impls_round_robin_in_workers_or_in_process(same_process):
    s = Shape(experts=2, **TINY)
    out = workers.time_impls(["softmoe", "naive-loop"], s, repeats=2, warmup=1, threads=1,
                                 same_process=same_process, processes=2)
    for name in ("softmoe", "naive-loop"):
        assert out[name]["fwd_s"] > 0 and out[name]["fwdbwd_s"] > 0
        assert out[name]["params"] == impls.param_count(impls.build("softmoe", s))


def test_a_failing_worker_reports_its_error():
    s = Shape(experts=2, **TINY)
    with pytest.raises(RuntimeError, match="(?s)worker for nope failed.*implementation must be one of"):
        workers.time_impls(["softmoe", "nope"], s, repeats=1, warmup=0, threads=1)


def test_python_dash_m_runs_the_same_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "softmoe.bench.layer", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: softmoe bench layer") and "--same-process" in done.stdout


# -- devices, dtypes, rooflines ------------------------------------------------------------------
def test_bf16_on_cpu_writes_tables_with_rooflines(tmp_path, monkeypatch):
    """`--device cpu --dtype bf16`: every implementation runs under CPU autocast; with the peaks
    given, roofline = max(FLOPs / peak, bytes / bandwidth) / time (x3 for fwd+bwd)."""
    monkeypatch.setattr(command, "S16", dict(TINY, batch=8))
    monkeypatch.setattr(command, "QUICK_BATCH", 2)
    monkeypatch.setattr(command, "matmul_gflops", lambda **kw: 10.0)
    n_before = torch.get_num_threads()
    try:
        rc = bench_layer.main(["--quick", "--threads", "1", "--repeats", "1", "--no-memory", "--same-process",
                               "--experts", "2", "--dtype", "bf16", "--peak-tflops", "0.5", "--peak-gbs", "20",
                               "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n_before)
    assert rc == 0
    s = Shape(experts=2, **dict(TINY, batch=2), dtype="bf16")
    roof = max(layer_flops(s) / 0.5e12, layer_bytes(s) / 20e9)
    rows = list(csv.DictReader(open(tmp_path / "layer.csv")))
    assert {r["implementation"] for r in rows} == {i.name for i in impls.available_impls()}
    for r in rows:
        assert float(r["fwdbwd_roofline"]) == pytest.approx(3 * roof / (float(r["fwdbwd_ms"]) / 1e3), rel=1e-6)
    md = open(tmp_path / "layer.md").read()
    assert "bf16 autocast on cpu" in md and "(cpu, bf16)" in md


def test_bf16_training_step_runs_under_autocast():
    """The benchmarked step really runs in bf16: the layer's output under the bench's autocast is bf16,
    and the gradients reach the fp32 weights."""
    s = Shape(experts=2, **TINY, dtype="bf16")
    model = impls.build("softmoe", s)
    x, dy = impls.make_inputs(s)
    assert impls.forward_no_grad(model, x).dtype == torch.bfloat16
    impls.train_step(model, x, dy)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_layer_bytes_by_hand():
    s = Shape(batch=2, tokens=3, dim=4, experts=5, slots=1, hidden=6, dtype="bf16")
    weights = 2 * 5 * 4 * 6 * (4 + 2)
    assert layer_bytes(s) == weights + 2 * (2 * 2 * 3 * 4 + 3 * 2 * 3 * 5 + 2 * 2 * 5 * 4 + 2 * 2 * 5 * 6)


@pytest.mark.parametrize("argv, match", [
    (["--dtype", "fp16"], "--dtype fp16 needs --device cuda"), (["--device", "tpu"], "--device"),
    (["--peak-tflops", "0"], "--peak-tflops"), (["--peak-gbs", "-1"], "--peak-gbs")])
def test_bad_device_arguments(argv, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        bench_layer.main(argv + ["--out", str(tmp_path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="--device='cuda' but CUDA is not available"):
        bench_layer.main(["--device", "cuda", "--out", str(tmp_path)])


def test_peak_table_lookup():
    from softmoe.bench import _peaks

    row = _peaks.lookup("NVIDIA H200")
    assert row["name"] == "H200" and row["gbs"] == 4800.0 and _peaks.peak_tflops(row, "bf16", tf32=False) == 989.0
    assert _peaks.peak_tflops(row, "fp32", tf32=True) == 494.5 and _peaks.peak_tflops(row, "fp32", tf32=False) == 67.0
    assert _peaks.lookup("Some Other GPU") is None


# -- two checkouts side by side (benchmarks/ab_layer.py) ----------------------------------------
def fake_checkout(folder, step_s: float):
    """A folder whose `softmoe` is a stand-in: its benchmark worker answers every round with a
    fixed training-step time."""
    pkg = folder / "softmoe" / "bench" / "layer"
    pkg.mkdir(parents=True)
    for init in (folder / "softmoe", folder / "softmoe" / "bench", pkg):
        (init / "__init__.py").write_text("")
    (pkg / "workers.py").write_text(
        "import sys\n"
        "def worker_main(argv):\n"
        "    print('READY 7', flush=True)\n"
        "    for line in sys.stdin:\n"
        f"        print('TIME 0.5 {step_s!r}', flush=True)\n"
        "    return 0\n")
    return folder


def test_a_worker_imports_the_softmoe_of_its_folder(tmp_path):
    w = workers.Worker("softmoe", Shape(experts=2, **TINY), 1, cwd=str(fake_checkout(tmp_path, 0.25)))
    try:
        assert w.params == 7 and w.round() == (0.5, 0.25)
    finally:
        w.close()


def load_ab_layer():
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "ab_layer.py"
    spec = importlib.util.spec_from_file_location("ab_layer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_layer_times_two_checkouts_and_the_port_side_by_side(tmp_path, capsys):
    ab = load_ab_layer()
    base, new = fake_checkout(tmp_path / "base", 0.2), fake_checkout(tmp_path / "new", 0.1)
    assert ab.main([str(base), str(new), "--experts", "8", "--repeats", "3"]) == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    # the port's worker starts in NEW: 0.1 s as well
    assert row == "| 8 | 200.0 | 100.0 | 2.000 | 100.0 | 0.50x | 1.00x |"


def test_ab_layer_rejects_a_folder_without_a_checkout(tmp_path, capsys):
    ab = load_ab_layer()
    with pytest.raises(SystemExit) as e:
        ab.main([str(tmp_path), str(tmp_path)])
    assert e.value.code == 2 and "expected a folder holding a softmoe checkout" in capsys.readouterr().err
