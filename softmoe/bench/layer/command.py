"""`softmoe bench layer`: its options, one table row per (E, implementation), the notes
and the summary lines, written as layer.md / layer.csv and printed."""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from softmoe import kernels as softmoe_kernels
from softmoe._tables import markdown_table, write_table
from softmoe.bench import matmul_gflops, peak_rss_supported

from .impls import IMPLS, available_impls
from .memory import measure_memory
from .shape import Shape, layer_flops
from .workers import ROUND_ROBIN_PARAM_BYTES, time_impls

FULL_EXPERTS = (8, 32, 128, 512)
QUICK_EXPERTS = (8, 32)
S16 = dict(batch=32, tokens=196, dim=384, hidden=1536, slots=1)  # paper's Soft MoE-S/16 layer
QUICK_BATCH = 8


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


def _check_args(args) -> None:
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.experts is not None and any(e < 1 for e in args.experts):
        raise ValueError(f"--experts must all be >= 1, got {args.experts}")


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

    @classmethod
    def from_args(cls, args) -> Settings:
        _check_args(args)
        impls = [i.name for i in available_impls(args.impls)]
        return cls(threads=args.threads, repeats=args.repeats or (3 if args.quick else 5),
                   processes=1 if args.same_process else args.processes or (1 if args.quick else 3),
                   same_process=args.same_process,
                   experts=tuple(args.experts or (QUICK_EXPERTS if args.quick else FULL_EXPERTS)),
                   base=dict(S16, batch=QUICK_BATCH) if args.quick else dict(S16), quick=args.quick,
                   impls=impls,
                   missing=[i.name for i in IMPLS if (not args.impls or i.name in args.impls) and i.name not in impls],
                   memory=not args.no_memory and peak_rss_supported())


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
        + (" (the paper's S/16 layer at E=128)" if not cfg.quick else " (--quick)") + "; float32.",
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
        f"of a 2048x2048x2048 fp32 torch.mm measured in this run.",
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
    mm = matmul_gflops()
    print(f"large-matmul reference: 2048^3 fp32 torch.mm = {mm:.1f} GFLOP/s")

    rows = []
    for E in cfg.experts:
        s = Shape(experts=E, **cfg.base)
        t0 = time.perf_counter()
        rows += measure_shape(s, cfg.impls, cfg.repeats, cfg.threads, mm, cfg.memory, cfg.same_process, cfg.processes)
        _print_rows(rows[-len(cfg.impls):], cfg.memory)
        print(f"  ({s.label()}, {time.perf_counter() - t0:.0f} s)")

    notes = _notes(cfg, kernels, mm)
    for line in speedup_summary(rows):
        print(line)
        notes.append(line)
    md, csv_path = write_table(args.out, "layer", COLUMNS, rows, "Soft MoE layer benchmark (CPU)", notes)
    print()
    print(markdown_table(COLUMNS, rows) + "\n")
    print(f"wrote {md} and {csv_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from softmoe.bench import layer

    parser = argparse.ArgumentParser(prog="softmoe bench layer", description=layer.__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
