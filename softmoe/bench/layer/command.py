"""`softmoe bench layer`: its options, one table row per (E, implementation), the notes
and the summary lines, written as layer.md / layer.csv and printed."""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from softmoe import kernels as softmoe_kernels
from softmoe._device import resolve_device
from softmoe.bench import _peaks
from softmoe._tables import markdown_table, write_table
from softmoe.bench import matmul_gflops, peak_rss_supported, triad_gbs

from .impls import IMPLS, available_impls
from .memory import measure_memory
from .shape import DTYPES, Shape, layer_bytes, layer_flops
from .workers import ROUND_ROBIN_PARAM_BYTES, time_impls

FULL_EXPERTS = (8, 32, 128, 512)
QUICK_EXPERTS = (8, 32)
S16 = dict(batch=32, tokens=196, dim=384, hidden=1536, slots=1)  # paper's Soft MoE-S/16 layer
QUICK_BATCH = 8


def roofline_terms(s: Shape, peak_tflops: float | None, peak_gbs: float | None) -> tuple[float, float] | None:
    """Seconds of one forward at the peaks, (FLOPs / peak FLOP/s, bytes / peak bandwidth): the
    roofline time is the larger, and the larger names the bound. None without both peaks."""
    if not peak_tflops or not peak_gbs:
        return None
    return layer_flops(s) / (peak_tflops * 1e12), layer_bytes(s) / (peak_gbs * 1e9)


def measure_shape(s: Shape, impls: list[str], repeats: int, threads: int, mm_gflops: float,
                  memory: bool = True, same_process: bool = False, processes: int = 1,
                  peaks: tuple = (None, None, "")) -> list[dict]:
    """One table row per implementation for shape `s` (see COLUMNS)."""
    times = time_impls(impls, s, repeats, threads=threads, same_process=same_process, processes=processes)
    mem = {n: measure_memory(n, s, threads) for n in impls} if memory else {}
    fl = layer_flops(s)
    terms = roofline_terms(s, peaks[0], peaks[1])
    roof = max(terms) if terms else None
    bound = None if terms is None else ("memory" if terms[1] > terms[0] else "compute")
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
            "fwd_roofline": roof / t["fwd_s"] if roof else None,
            "fwdbwd_roofline": 3 * roof / t["fwdbwd_s"] if roof else None, "bound": bound,
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
        if ours[0]["fwdbwd_roofline"] is not None:
            line += f"; softmoe fwd+bwd at {ours[0]['fwdbwd_roofline']:.0%} of the ({ours[0]['bound']}-bound) roofline"
        if ours[0]["fwdbwd_peak_MB"] is not None and best["fwdbwd_peak_MB"]:
            line += f", peak memory {ours[0]['fwdbwd_peak_MB'] / best['fwdbwd_peak_MB']:.2f}x the port's"
        lines.append(line + ".")
    return lines


# -- the command -----------------------------------------------------------------------------------
COLUMNS = ["E", "implementation", "params_M", "fwd_ms", "fwd_GFLOPs", "fwd_frac_mm", "fwdbwd_ms",
           "fwdbwd_GFLOPs", "fwdbwd_frac_mm", "fwdbwd_vs_softmoe", "fwd_roofline", "fwdbwd_roofline", "bound",
           "fwd_peak_MB", "fwdbwd_peak_MB"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"small subset (B={QUICK_BATCH}, E in {list(QUICK_EXPERTS)}, 3 repeats): "
                             "well under a minute")
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
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N; CUDA times are CUDA events (device time)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                        help="fp32 (default), or bf16 / fp16 under torch.autocast (weights stay fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every implementation")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s in --dtype, for the %%-of-roofline columns (CUDA: "
                             "default from a table of known GPUs)")
    parser.add_argument("--peak-gbs", type=float, default=None, help="the device's memory bandwidth in GB/s (idem)")


def _check_args(args) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.experts is not None and any(e < 1 for e in args.experts):
        raise ValueError(f"--experts must all be >= 1, got {args.experts}")
    for name in ("peak_tflops", "peak_gbs"):
        if getattr(args, name, None) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures, resolved from the options and their --quick defaults."""
    threads: int
    repeats: int
    processes: int
    same_process: bool
    experts: tuple[int, ...]
    base: dict  # the Shape fields other than experts
    quick: bool
    impls: list[str]  # installed, in IMPLS order
    missing: list[str]  # asked for (or all) but not installed
    memory: bool
    peaks: tuple[float | None, float | None, str]  # (peak TFLOP/s in dtype, GB/s, where they come from)

    @property
    def device(self) -> str:
        return self.base["device"]

    @classmethod
    def from_args(cls, args) -> Settings:
        _check_args(args)
        device = str(resolve_device(args.device, "--device"))
        if args.dtype == "fp16" and device == "cpu":
            raise ValueError("--dtype fp16 needs --device cuda (CPU autocast runs bf16); use --dtype bf16 or fp32")
        impls = [i.name for i in available_impls(args.impls)]
        base = dict(S16, batch=QUICK_BATCH) if args.quick else dict(S16)
        base.update(device=device, dtype=args.dtype, compile=args.compile)
        return cls(threads=args.threads, repeats=args.repeats or (3 if args.quick else 5),
                   processes=1 if args.same_process else args.processes or (1 if args.quick else 3),
                   same_process=args.same_process,
                   experts=tuple(args.experts or (QUICK_EXPERTS if args.quick else FULL_EXPERTS)),
                   base=base, quick=args.quick,
                   impls=impls,
                   missing=[i.name for i in IMPLS if (not args.impls or i.name in args.impls) and i.name not in impls],
                   memory=not args.no_memory and device == "cpu" and peak_rss_supported(),
                   peaks=device_peaks(device, args.dtype, args.peak_tflops, args.peak_gbs))


def device_peaks(device: str, dtype: str, tflops: float | None, gbs: float | None
                 ) -> tuple[float | None, float | None, str]:
    """(peak TFLOP/s in `dtype`, peak GB/s, source): the overrides, else (CUDA) the table row of
    this GPU (TF32 counts for fp32 only if torch allows it), else None."""
    source = "--peak-tflops / --peak-gbs"
    if device.startswith("cuda") and (tflops is None or gbs is None):
        name = torch.cuda.get_device_name(torch.device(device))
        row = _peaks.lookup(name)
        if row is not None:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            tflops = tflops or _peaks.peak_tflops(row, dtype, tf32)
            gbs = gbs or row["gbs"]
            source = f"the data sheet of the {row['name']} (softmoe/bench/_peaks.py; fp32 {'TF32' if tf32 else 'SIMT'})"
        else:
            source = f"{name} is not in softmoe/bench/_peaks.py: pass --peak-tflops and --peak-gbs"
    return tflops, gbs, source


TRIAD_MIB = 256  # per array of the bandwidth measurement: far beyond any cache, 0.2 s a pass


def cpu_peaks(mm_gflops: float, tflops: float | None, gbs: float | None) -> tuple[float, float, str]:
    """A CPU has no data-sheet peaks here: what was not given is measured in this run, the FLOP
    rate as the large-matmul rate `mm_gflops`, the bandwidth as a STREAM triad (`triad_gbs`) at
    the benchmark's threads. (peak TFLOP/s, GB/s, where they come from)."""
    measured = []
    if not tflops:
        tflops = mm_gflops / 1e3
        measured.append("the large-matmul rate")
    if not gbs:
        gbs = triad_gbs(TRIAD_MIB)
        measured.append(f"a STREAM triad over three {TRIAD_MIB} MiB float32 arrays (3 x {TRIAD_MIB} MiB a pass)")
    return tflops, gbs, "measured in this run: " + " and ".join(measured)


def _print_rows(rows: list[dict], memory: bool) -> None:
    for r in rows:
        print(f"E={r['E']:4d} {r['implementation']:17s} fwd {r['fwd_ms']:8.1f} ms ({r['fwd_frac_mm']:5.1%} of mm)  "
              f"fwd+bwd {r['fwdbwd_ms']:8.1f} ms ({r['fwdbwd_frac_mm']:5.1%} of mm)  "
              f"x{r['fwdbwd_vs_softmoe'] or float('nan'):.2f} vs softmoe"
              + (f"  peak {r['fwd_peak_MB']:.0f} / {r['fwdbwd_peak_MB']:.0f} MB" if memory else ""))


def _notes(cfg: Settings, kernels: str, mm: float) -> list[str]:
    """The bullet list above the table: how everything was measured."""
    base, processes, repeats = cfg.base, cfg.processes, cfg.repeats
    notes = [
        f"Shape: B={base['batch']}, N={base['tokens']}, D={base['dim']}, H={base['hidden']}, P={base['slots']}"
        + (" (the paper's S/16 layer at E=128)" if not cfg.quick else " (--quick)")
        + (f"; {cfg.base['dtype']} on {cfg.device}" if cfg.base["dtype"] == "fp32" else
           f"; fp32 weights, {cfg.base['dtype']} autocast on {cfg.device}")
        + (", torch.compile" if cfg.base["compile"] else "") + ".",
        f"torch {torch.__version__}, torch.set_num_threads({cfg.threads}), {platform.machine()}; medians of "
        f"{processes * repeats} rounds ({processes} x {repeats} after 2 warm-up rounds each); implementations "
        "timed round-robin, "
        + ("all in one process " if cfg.same_process else
           f"each in worker processes of its own, {processes} one after another (as in real use: one "
           "implementation per process, with its own malloc state; caches shared, as with a model's other layers) ")
        + f"(one at a time when all weights together exceed {ROUND_ROBIN_PARAM_BYTES >> 30} GiB).",
        f"softmoe's expert kernels (softmoe.kernels, where they apply): {kernels}.",
        "fwd: torch.no_grad() forward. fwd+bwd: forward + backward(dy) with the input requiring grad and "
        "parameter grads set to None before each step (as optimizer.zero_grad(); softmoe then reuses the "
        "buffers, see Peak memory).",
        f"GFLOPs = nominal layer FLOPs / time: forward = 2BNDS (logits) + 2BNSD (dispatch) + 4BSDH (experts) "
        f"+ 2BNSD (combine), S=E*P, fwd+bwd = 3x forward; frac_mm = that / {mm:.1f} GFLOP/s, the median rate "
        f"of a {'8192' if cfg.device != 'cpu' else '2048'}^3 {cfg.base['dtype']} torch.mm measured in this run.",
        (f"roofline = (max(FLOPs / {cfg.peaks[0]:g} TFLOP/s, nominal bytes / {cfg.peaks[1]:.1f} GB/s)) / time "
         f"(peaks: {cfg.peaks[2]}); bytes as in softmoe/bench/layer/shape.py (layer_bytes); bound: which of the "
         "two terms is larger."
         if cfg.peaks[0] and cfg.peaks[1] else f"roofline: not computed ({cfg.peaks[2]})."),
        ("Times: device time between CUDA events around each pass, synchronized before each round."
         if cfg.device != "cpu" else "Times: time.perf_counter around each pass."),
        ("Peak memory: peak RSS (VmHWM, reset via /proc/self/clear_refs) above the RSS just before the pass, "
         "in a fresh subprocess per (implementation, E) after model creation and one warm-up pass (fwd: before "
         "any training step), glibc "
         "MALLOC_MMAP_THRESHOLD_=65536 so freed memory returns to the OS; fwd+bwd includes the new parameter grads; "
         "buffers softmoe's BufferPools keep between steps (reused weight grads and temporaries) are counted in full."
         if cfg.memory else "Peak memory: not measured."),
        "fwdbwd_vs_softmoe = fwd+bwd time / softmoe's fwd+bwd time (> 1: slower than softmoe).",
    ] + [f"{i.name}: {i.note}" for i in IMPLS if i.name in cfg.impls]
    if cfg.missing:
        notes.append(f"not installed, skipped: {', '.join(cfg.missing)}")
    return notes


def run(args) -> int:
    cfg = Settings.from_args(args)
    torch.set_num_threads(cfg.threads)
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, torch.set_num_threads({cfg.threads}), {cpu}")
    if cfg.missing:
        print(f"not installed, skipped: {', '.join(cfg.missing)}")
    kernels = softmoe_kernels.status()
    print(f"softmoe expert kernels: {kernels}")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.base["dtype"]]
    n = 2048 if cfg.device == "cpu" else 8192
    mm = matmul_gflops(n=n, dtype=dt, device=cfg.device)
    print(f"large-matmul reference: {n}^3 {cfg.base['dtype']} torch.mm on {cfg.device} = {mm:.1f} GFLOP/s")
    if cfg.device == "cpu" and not (cfg.peaks[0] and cfg.peaks[1]):
        cfg = dataclasses.replace(cfg, peaks=cpu_peaks(mm, *cfg.peaks[:2]))
        print(f"CPU roofline: {cfg.peaks[0]:g} TFLOP/s, {cfg.peaks[1]:.1f} GB/s ({cfg.peaks[2]})")

    rows = []
    for E in cfg.experts:
        s = Shape(experts=E, **cfg.base)
        t0 = time.perf_counter()
        rows += measure_shape(s, cfg.impls, cfg.repeats, cfg.threads, mm, cfg.memory, cfg.same_process, cfg.processes,
                              cfg.peaks)
        _print_rows(rows[-len(cfg.impls):], cfg.memory)
        print(f"  ({s.label()}, {time.perf_counter() - t0:.0f} s)")

    notes = _notes(cfg, kernels, mm)
    for line in speedup_summary(rows):
        print(line)
        notes.append(line)
    title = f"Soft MoE layer benchmark ({cfg.device}, {cfg.base['dtype']})"
    md, csv_path = write_table(args.out, "layer", COLUMNS, rows, title, notes)
    print()
    print(markdown_table(COLUMNS, rows) + "\n")
    print(f"wrote {md} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from softmoe.bench import layer

    parser = argparse.ArgumentParser(prog="softmoe bench layer", description=layer.__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
