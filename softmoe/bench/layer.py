"""Layer benchmark: SoftMoE against a naive per-expert loop and the PyPI ports (time, GFLOP/s, peak memory).

For each number of experts E (the paper's S/16 shape B=32, N=196, D=384, H=1536, P=1 and
E in {8, 32, 128, 512}), every implementation gets the same input and is timed forward
(no_grad) and forward+backward (input requires grad, parameter grads set to None before each
step as `optimizer.zero_grad()` does). Implementations are timed side by side, round-robin,
so that machine noise hits all of them alike; medians are reported. Each implementation runs
in a worker process of its own (`--same-process`: all in this one), because in one process
their allocations change each other's page faults. Peak memory is measured in a fresh
subprocess per (implementation, E). Times are also given as GFLOP/s of the
layer's nominal matmul FLOPs and as a fraction of this machine's large-matmul rate measured
in the same run.

Implementations:
  softmoe           this project's SoftMoE (stacked experts, batched matmuls).
  naive-loop        the same function with a Python loop over per-expert nn.Sequential MLPs
                    (`NaiveSoftMoE`; a baseline, deliberately unoptimised).
  soft-moe-pytorch  lucidrains' port (`pip install soft-moe-pytorch`), when installed.
  soft-moe          bwconrad's port (`pip install soft-moe`), when installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from softmoe import kernels as softmoe_kernels
from softmoe.bench import markdown_table, matmul_gflops, peak_rss_bytes, peak_rss_supported, write_table

FULL_EXPERTS = (8, 32, 128, 512)
QUICK_EXPERTS = (8, 32)
S16 = dict(batch=32, tokens=196, dim=384, hidden=1536, slots=1)  # paper's Soft MoE-S/16 layer
QUICK_BATCH = 8
# Above this many parameter bytes for all implementations together, one E is timed one
# implementation at a time instead of round-robin (E=512 is 2.4 GB of weights each).
ROUND_ROBIN_PARAM_BYTES = 3 << 30


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int
    dim: int
    experts: int
    slots: int
    hidden: int

    def label(self) -> str:
        return f"B={self.batch} N={self.tokens} D={self.dim} E={self.experts} P={self.slots} H={self.hidden}"


def layer_flops(s: Shape) -> int:
    """Nominal forward FLOPs of one Soft MoE layer (a multiply-add = 2; matmuls/einsums only):
    routing logits 2BNDS + dispatch 2BNSD + experts 2*2BSDH + combine 2BNSD, S = E*P.
    Forward+backward counts 3x this (each matmul has two backward matmuls of its size)."""
    S = s.experts * s.slots
    return 2 * s.batch * s.tokens * s.dim * S * 3 + 4 * s.batch * S * s.dim * s.hidden


# -- the naive baseline ------------------------------------------------------------------------
def _expert_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class NaiveSoftMoE(nn.Module):
    """Soft MoE written the obvious way: the same math as `softmoe.SoftMoE` (l2-normalised
    logits with a learned scale, softmax over tokens / over all slots, dispatch of the
    un-normalised tokens, tanh-GELU expert MLPs), but with one `nn.Sequential` per expert
    applied in a Python loop. A benchmark baseline only.

    forward(x: (B, N, D)) -> (B, N, D)
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int = 1, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        self.phi = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / (dim * num_experts) ** 0.5)
        self.scale = nn.Parameter(torch.ones(()))
        self.experts = nn.ModuleList(_expert_mlp(dim, hidden_dim) for _ in range(num_experts))

    @classmethod
    def from_soft_moe(cls, layer) -> "NaiveSoftMoE":
        """A copy of `layer`'s weights (SoftMoE with soft dispatch and combine, normalize=True)."""
        ex = layer.experts
        naive = cls(layer.dim, layer.num_experts, layer.slots_per_expert, ex.hidden_dim).to(ex.w1.dtype)
        with torch.no_grad():
            naive.phi.copy_(layer.router.phi)
            naive.scale.copy_(layer.router.scale)
            for e, mlp in enumerate(naive.experts):
                mlp[0].weight.copy_(ex.w1[e].T)
                mlp[0].bias.copy_(ex.b1[e])
                mlp[2].weight.copy_(ex.w2[e].T)
                mlp[2].bias.copy_(ex.b2[e])
        return naive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # (B, N, D)
        phin = self.phi * torch.rsqrt(self.phi.pow(2).sum(0, keepdim=True) + 1e-6)  # (D, E, P)
        logits = self.scale * torch.einsum("bnd,dep->bnep", xn, phin)  # (B, N, E, P)
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        slots = torch.einsum("bnep,bnd->bepd", dispatch, x)  # (B, E, P, D)
        ys = torch.stack([mlp(slots[:, e]) for e, mlp in enumerate(self.experts)], dim=1)  # (B, E, P, D)
        return torch.einsum("bnep,bepd->bnd", combine, ys)


# -- the implementations -----------------------------------------------------------------------
def _load_soft_moe_port():
    """bwconrad's `soft_moe/soft_moe.py`, loaded by file: the package `__init__` also imports
    its ViT, which needs timm, and the layer itself does not."""
    spec = importlib.util.find_spec("soft_moe")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("soft-moe is not installed (pip install --no-deps soft-moe)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "soft_moe.py")
    mod_spec = importlib.util.spec_from_file_location("_softmoe_bench_port_soft_moe", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _build_softmoe(s: Shape) -> nn.Module:
    from softmoe import SoftMoE

    return SoftMoE(s.dim, s.experts, s.slots, s.hidden)


def _build_naive(s: Shape) -> nn.Module:
    return NaiveSoftMoE(s.dim, s.experts, s.slots, s.hidden)


def _build_lucidrains(s: Shape) -> nn.Module:
    from soft_moe_pytorch import SoftMoE as LucidSoftMoE

    mult = s.hidden / s.dim
    if int(s.dim * mult) != s.hidden:
        raise ValueError(f"soft-moe-pytorch needs hidden = dim * mult exactly, got hidden={s.hidden}, dim={s.dim}")
    # No CPU offloading (it moves every expert on every forward) and no torch.distributed.
    return LucidSoftMoE(s.dim, num_experts=s.experts, num_slots=s.slots, expert_mult=mult,
                        is_distributed=False, offload_unused_experts_to_cpu=False)


def _build_bwconrad(s: Shape) -> nn.Module:
    port = _load_soft_moe_port()
    return port.SoftMoELayerWrapper(dim=s.dim, num_experts=s.experts, slots_per_expert=s.slots,
                                    layer=functools.partial(_expert_mlp, s.dim, s.hidden))


@dataclasses.dataclass(frozen=True)
class Impl:
    name: str
    build: object
    module: str | None  # import that must succeed, None = always available
    note: str


IMPLS = (
    Impl("softmoe", _build_softmoe, None,
         "this project: experts stacked as (E, D, H) weights, two batched matmuls (softmoe.kernels where "
         "they apply); routing in float32; "
         "fused autograd nodes; weight-grad and activation buffers reused between training steps (BufferPool)."),
    Impl("naive-loop", _build_naive, None,
         "the same function as softmoe (tests check equal outputs and grads in float64), one "
         "nn.Sequential(Linear, GELU-tanh, Linear) per expert in a Python loop, einsum mixing."),
    Impl("soft-moe-pytorch", _build_lucidrains, "soft_moe_pytorch",
         "lucidrains' port, configured num_slots=P, expert_mult=H/D, no CPU offload, not distributed. "
         "Differs: RMSNorm with learned gain on tokens and on slot embeddings (no phi l2-norm + scale), "
         "dispatches the normalised tokens, exact (erf) GELU, Dropout(0) in each expert, Python loop over experts."),
    Impl("soft-moe", _build_bwconrad, "soft_moe",
         "bwconrad's port (layer file only; its package __init__ needs timm), given the same "
         "Linear/GELU-tanh/Linear expert. Differs: dispatches the normalised tokens, a four-kernel "
         "softmax, einsum mixing, Python loop over experts."),
)


def available_impls(names=None) -> list[Impl]:
    out = []
    for impl in IMPLS:
        if names and impl.name not in names:
            continue
        if impl.module is not None and importlib.util.find_spec(impl.module) is None:
            continue
        out.append(impl)
    return out


def _impl(name: str) -> Impl:
    for impl in IMPLS:
        if impl.name == name:
            return impl
    raise ValueError(f"implementation must be one of {[i.name for i in IMPLS]}, got {name!r}")


def build(name: str, s: Shape, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _impl(name).build(s).train()


def _inputs(s: Shape, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.batch, s.tokens, s.dim, generator=g)
    dy = torch.randn(s.batch, s.tokens, s.dim, generator=g)
    return x, dy


def _forward(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model(x)


def _train_step(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    for p in model.parameters():  # optimizer.zero_grad(): grads start from None every step
        p.grad = None
    xg = x.detach().requires_grad_()  # the block's LayerNorm output needs its gradient too
    model(xg).backward(dy)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing --------------------------------------------------------------------------------------
def _time_round(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    t0 = time.perf_counter()
    _forward(model, x)
    t1 = time.perf_counter()
    _train_step(model, x, dy)
    return t1 - t0, time.perf_counter() - t1


class _Worker:
    """One implementation in a Python process of its own, timed one round at a time on request.

    Why: in real use one implementation owns the process. Sharing one would let each
    implementation's allocations change the others' page faults (glibc's mmap threshold and
    heap are per process): in one process the ports ran up to 25% faster or slower depending
    on what ran before them. Caches are still shared, as they are with a model's other layers."""

    def __init__(self, name: str, s: Shape, threads: int) -> None:
        spec = json.dumps({"impl": name, "shape": dataclasses.asdict(s), "threads": threads})
        code = "import sys; from softmoe.bench.layer import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-c", code, spec], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.params = int(self._reply("READY")[0])

    def _reply(self, tag: str) -> list[str]:
        line = self.proc.stdout.readline()
        if not line.startswith(tag + " "):
            self.proc.kill()
            self.proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"benchmark worker for {self.name} failed (exit {self.proc.returncode}):\n"
                               f"{self._stderr.read()[-2000:]}")
        return line.split()[1:]

    def round(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        fwd, fb = self._reply("TIME")
        return float(fwd), float(fb)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._stderr.close()


def worker_main(argv: list[str]) -> int:
    """The `_Worker` process: build, then one timed forward + training step per "run" line."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    s = Shape(**spec["shape"])
    model = build(spec["impl"], s)
    x, dy = _inputs(s)
    print(f"READY {param_count(model)}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        fwd, fb = _time_round(model, x, dy)
        print(f"TIME {fwd!r} {fb!r}", flush=True)
    return 0


def time_impls(names: list[str], s: Shape, repeats: int, warmup: int = 2, threads: int | None = None,
               same_process: bool = False, processes: int = 1) -> dict[str, dict]:
    """{name: {"fwd_s", "fwdbwd_s", "params"}}: medians over rounds timed round-robin, each
    implementation in worker processes of its own: `processes` of them one after another,
    `warmup` + `repeats` rounds each (so one process's allocator luck cannot decide the
    result). `same_process`: all implementations in this process, one pass."""
    threads = threads or torch.get_num_threads()
    bytes_each = 4 * 2 * s.experts * s.dim * s.hidden
    groups = [names] if bytes_each * len(names) <= ROUND_ROBIN_PARAM_BYTES else [[n] for n in names]
    times = {n: ([], []) for n in names}
    params = {}
    for group in groups:
        for _ in range(1 if same_process else processes):
            workers = {}
            try:
                if same_process:
                    x, dy = _inputs(s)
                    models = {n: build(n, s) for n in group}
                    rounds = {n: functools.partial(_time_round, m, x, dy) for n, m in models.items()}
                    params.update({n: param_count(m) for n, m in models.items()})
                else:
                    for n in group:
                        workers[n] = _Worker(n, s, threads)
                    rounds = {n: w.round for n, w in workers.items()}
                    params.update({n: w.params for n, w in workers.items()})
                for r in range(warmup + repeats):
                    for n, step in rounds.items():
                        fwd, fb = step()
                        if r >= warmup:
                            times[n][0].append(fwd)
                            times[n][1].append(fb)
            finally:
                for w in workers.values():
                    w.close()
                rounds = models = None
    return {n: {"fwd_s": statistics.median(times[n][0]), "fwdbwd_s": statistics.median(times[n][1]),
                "params": params[n]} for n in names}


# -- peak memory (one fresh subprocess per measurement) -------------------------------------------
def _probe(name: str, s: Shape, threads: int) -> dict:
    """Runs inside the subprocess: peak RSS above the baseline after model creation and one
    warm-up pass of the same kind (so one-time allocations such as thread pools are not
    counted). The forward is measured before any training step (inference use). Buffers
    that softmoe's `BufferPool`s keep from the warm-up are resident before the measured pass,
    so they are added back: the figure is what the pass needs on top of the model and its
    inputs, retained buffers included."""
    from softmoe.layers.buffers import pooled_bytes

    torch.set_num_threads(threads)
    model = build(name, s)
    x, dy = _inputs(s)
    _forward(model, x)
    fwd = pooled_bytes(model) + peak_rss_bytes(lambda: _forward(model, x))
    _train_step(model, x, dy)
    for p in model.parameters():
        p.grad = None
    fb = pooled_bytes(model) + peak_rss_bytes(lambda: _train_step(model, x, dy))
    return {"fwd_peak_bytes": fwd, "fwdbwd_peak_bytes": fb}


def probe_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = _probe(spec["impl"], Shape(**spec["shape"]), spec["threads"])
    print("PROBE " + json.dumps(result))
    return 0


def measure_memory(name: str, s: Shape, threads: int, timeout: float = 600) -> dict:
    """Peak-RSS probe of one (implementation, shape) in a fresh Python process. glibc's mmap
    threshold is pinned at 64 KiB there, so freed blocks go back to the OS at once and RSS
    follows live memory."""
    spec = json.dumps({"impl": name, "shape": dataclasses.asdict(s), "threads": threads})
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    code = "import sys; from softmoe.bench.layer import probe_main; sys.exit(probe_main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, env=env,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise RuntimeError(f"memory probe for {name} {s.label()} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def measure_shape(s: Shape, impls: list[str], repeats: int, threads: int, mm_gflops: float,
                  memory: bool = True, same_process: bool = False, processes: int = 1) -> list[dict]:
    """One table row per implementation for shape `s` (see COLUMNS)."""
    times = time_impls(impls, s, repeats, threads=threads, same_process=same_process, processes=processes)
    mem = {n: measure_memory(n, s, threads) for n in impls} if memory else {}
    fl = layer_flops(s)
    ref = times.get("softmoe", {}).get("fwdbwd_s")
    rows = []
    for n in impls:
        t, m = times[n], mem.get(n, {})
        rows.append({
            "E": s.experts, "implementation": n, "params_M": t["params"] / 1e6,
            "fwd_ms": 1e3 * t["fwd_s"], "fwd_GFLOPs": fl / t["fwd_s"] / 1e9,
            "fwd_frac_mm": fl / t["fwd_s"] / 1e9 / mm_gflops,
            "fwdbwd_ms": 1e3 * t["fwdbwd_s"], "fwdbwd_GFLOPs": 3 * fl / t["fwdbwd_s"] / 1e9,
            "fwdbwd_frac_mm": 3 * fl / t["fwdbwd_s"] / 1e9 / mm_gflops,
            "fwdbwd_vs_softmoe": t["fwdbwd_s"] / ref if ref else None,
            "fwd_peak_MB": m["fwd_peak_bytes"] / 2**20 if m else None,
            "fwdbwd_peak_MB": m["fwdbwd_peak_bytes"] / 2**20 if m else None,
        })
    return rows


def speedup_summary(rows: list[dict]) -> list[str]:
    """Per E: softmoe's fwd+bwd speed-up over the faster installed port, and peak-memory ratio."""
    ports = {"soft-moe-pytorch", "soft-moe"}
    lines = []
    for E in sorted({r["E"] for r in rows}):
        ours = [r for r in rows if r["E"] == E and r["implementation"] == "softmoe"]
        theirs = [r for r in rows if r["E"] == E and r["implementation"] in ports]
        if not ours or not theirs:
            continue
        best = min(theirs, key=lambda r: r["fwdbwd_ms"])
        line = (f"E={E}: softmoe fwd+bwd is {best['fwdbwd_ms'] / ours[0]['fwdbwd_ms']:.2f}x faster than the faster "
                f"port ({best['implementation']})")
        if ours[0]["fwdbwd_peak_MB"] is not None and best["fwdbwd_peak_MB"]:
            line += f", peak memory {ours[0]['fwdbwd_peak_MB'] / best['fwdbwd_peak_MB']:.2f}x the port's"
        lines.append(line + ".")
    return lines


# -- the command -----------------------------------------------------------------------------------
COLUMNS = ["E", "implementation", "params_M", "fwd_ms", "fwd_GFLOPs", "fwd_frac_mm", "fwdbwd_ms",
           "fwdbwd_GFLOPs", "fwdbwd_frac_mm", "fwdbwd_vs_softmoe", "fwd_peak_MB", "fwdbwd_peak_MB"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"small subset (B={QUICK_BATCH}, E in {list(QUICK_EXPERTS)}, 3 repeats): well under a minute")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", default="bench_results", help="output folder for layer.md / layer.csv")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default 5, quick 3)")
    parser.add_argument("--experts", type=int, nargs="+", default=None, help="override the list of E")
    parser.add_argument("--impls", nargs="+", default=None, choices=[i.name for i in IMPLS],
                        help="only these implementations")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes per implementation, one after another (default 3, quick 1)")
    parser.add_argument("--same-process", action="store_true",
                        help="time every implementation in this process instead of one worker process each")


def _check_args(args) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.experts is not None and any(e < 1 for e in args.experts):
        raise ValueError(f"--experts must all be >= 1, got {args.experts}")


def run(args) -> int:
    _check_args(args)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    processes = 1 if args.same_process else args.processes or (1 if args.quick else 3)
    experts = args.experts or (QUICK_EXPERTS if args.quick else FULL_EXPERTS)
    base = dict(S16, batch=QUICK_BATCH) if args.quick else dict(S16)
    impls = [i.name for i in available_impls(args.impls)]
    missing = [i.name for i in IMPLS if (not args.impls or i.name in args.impls) and i.name not in impls]
    memory = not args.no_memory and peak_rss_supported()
    print(f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {platform.processor() or platform.machine()}")
    if missing:
        print(f"not installed, skipped: {', '.join(missing)}")

    kernels = softmoe_kernels.status()
    print(f"softmoe expert kernels: {kernels}")
    mm = matmul_gflops()
    print(f"large-matmul reference: 2048^3 fp32 torch.mm = {mm:.1f} GFLOP/s")
    rows = []
    for E in experts:
        s = Shape(experts=E, **base)
        t0 = time.perf_counter()
        rows += measure_shape(s, impls, repeats, args.threads, mm, memory, args.same_process, processes)
        for r in rows[-len(impls):]:
            print(f"E={E:4d} {r['implementation']:17s} fwd {r['fwd_ms']:8.1f} ms ({r['fwd_frac_mm']:5.1%} of mm)  "
                  f"fwd+bwd {r['fwdbwd_ms']:8.1f} ms ({r['fwdbwd_frac_mm']:5.1%} of mm)  "
                  f"x{r['fwdbwd_vs_softmoe'] or float('nan'):.2f} vs softmoe"
                  + (f"  peak {r['fwd_peak_MB']:.0f} / {r['fwdbwd_peak_MB']:.0f} MB" if memory else ""))
        print(f"  ({s.label()}, {time.perf_counter() - t0:.0f} s)")

    notes = [
        f"Shape: B={base['batch']}, N={base['tokens']}, D={base['dim']}, H={base['hidden']}, P={base['slots']}"
        + (" (the paper's S/16 layer at E=128)" if not args.quick else " (--quick)") + "; float32.",
        f"torch {torch.__version__}, torch.set_num_threads({args.threads}), {platform.machine()}; medians of "
        f"{processes * repeats} rounds ({processes} x {repeats} after 2 warm-up rounds each); implementations "
        "timed round-robin, "
        + ("all in one process " if args.same_process else
           f"each in worker processes of its own, {processes} one after another (as in real use: one "
           "implementation per process, with its own malloc state; caches shared, as with a model's other layers) ")
        + f"(one at a time when all weights together exceed {ROUND_ROBIN_PARAM_BYTES >> 30} GiB).",
        f"softmoe's expert kernels (softmoe.kernels, where they apply): {kernels}.",
        "fwd: torch.no_grad() forward. fwd+bwd: forward + backward(dy) with the input requiring grad and "
        "parameter grads set to None before each step (as optimizer.zero_grad(); softmoe then reuses the "
        "buffers, see Peak memory).",
        f"GFLOPs = nominal layer FLOPs / time: forward = 2BNDS (logits) + 2BNSD (dispatch) + 4BSDH (experts) "
        f"+ 2BNSD (combine), S=E*P, fwd+bwd = 3x forward; frac_mm = that / {mm:.1f} GFLOP/s, the median rate "
        f"of a 2048x2048x2048 fp32 torch.mm measured in this run.",
        ("Peak memory: peak RSS (VmHWM, reset via /proc/self/clear_refs) above the RSS just before the pass, "
         "in a fresh subprocess per (implementation, E) after model creation and one warm-up pass (fwd: before "
         "any training step), glibc "
         "MALLOC_MMAP_THRESHOLD_=65536 so freed memory returns to the OS; fwd+bwd includes the new parameter grads; "
         "buffers softmoe's BufferPools keep between steps (reused weight grads and temporaries) are counted in full."
         if memory else "Peak memory: not measured."),
        "fwdbwd_vs_softmoe = fwd+bwd time / softmoe's fwd+bwd time (> 1: slower than softmoe).",
    ] + [f"{i.name}: {i.note}" for i in IMPLS if i.name in impls]
    if missing:
        notes.append(f"not installed, skipped: {', '.join(missing)}")
    for line in speedup_summary(rows):
        print(line)
        notes.append(line)
    md, csv_path = write_table(args.out, "layer", COLUMNS, rows, "Soft MoE layer benchmark (CPU)", notes)
    print()
    print(markdown_table(COLUMNS, rows))
    print(f"wrote {md} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="softmoe bench layer", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
