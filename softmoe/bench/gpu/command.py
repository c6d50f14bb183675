"""`softmoe bench gpu`: options, the four parts in order within a time budget, gpu.json + gpu.md."""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch

from softmoe._device import resolve_device
from softmoe._io import atomic_write_json, atomic_write_text
from softmoe._tables import markdown_table

from . import correctness, resume, speed

# mm_n: the size of the square matmul whose rate is the "% of mm" reference (None: 2048 on a CPU, 8192 on a GPU;
# small in --smoke, where a CPU that emulates bf16 would spend minutes on 2048^3).
FULL = dict(base=dict(tokens=196, dim=384, hidden=1536, slots=1), batches=[32, 256], experts=[128, 8], repeats=10,
            mm_n=None,
            train=dict(models=["soft_moe_s16", "vit_s16"], batch=128, img=224, steps=10, overrides={}))
SMOKE = dict(base=dict(tokens=5, dim=8, hidden=16, slots=1), batches=[2], experts=[4], repeats=2, mm_n=128,
             train=dict(models=["soft_moe_micro", "vit_micro"], batch=4, img=8, steps=2,
                        overrides={"patch_size": 4}))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="bench_results/gpu", help="output folder for gpu.json / gpu.md")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --smoke")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks the command itself")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd layers (slower)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="stop starting new parts after this many seconds (default 480: 8 minutes)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak TFLOP/s (roofline)")
    parser.add_argument("--peak-gbs", type=float, default=None, help="override the memory bandwidth GB/s (roofline)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def _parts(device: torch.device, args, sizes: dict, workdir: Path):
    dtypes = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    t = sizes["train"]
    models = t["models"]
    yield "correctness", lambda: correctness.check(device, dtypes)
    yield "layer", lambda: speed.layer_rows(device, ["fp32", "bf16"], sizes["batches"], sizes["experts"],
                                            sizes["base"], sizes["repeats"], args.compile, args.peak_tflops,
                                            args.peak_gbs, mm_n=sizes["mm_n"])
    yield "training", lambda: [{"model": m, "batch": t["batch"], "img_size": t["img"], "bf16": True,
                                "img_per_s": speed.train_img_per_s(device, m, t["batch"], t["steps"], t["img"], True,
                                                                   t["overrides"])} for m in models]
    yield "resume", lambda: resume.kill_and_resume(workdir, str(device), steps=40 if args.smoke else 400,
                                                   every=10 if args.smoke else 20)


def run(args) -> int:
    if args.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
    device = resolve_device(args.device, "--device")
    if device.type != "cuda" and not args.smoke:
        raise ValueError(f"--device={args.device!r}: the GPU check needs a CUDA device (use --smoke to check the "
                         "command on the CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    out = Path(args.out)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke, "parts": {}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, part in _parts(device, args, sizes, Path(tmp) / "train"):
            if time.perf_counter() - t0 > args.budget_s:
                report["parts"][name] = {"skipped": f"the {args.budget_s:.0f} s budget was spent"}
                continue
            t = time.perf_counter()
            try:
                result = part()
                report["parts"][name] = {"seconds": time.perf_counter() - t, "result": result}
            except Exception as e:  # a failing part is reported, and the others still run
                report["parts"][name] = {"seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}",
                                         "traceback": traceback.format_exc()[-3000:]}
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - t0
    ok = _verdict(report)
    report["ok"] = ok
    atomic_write_json(out / "gpu.json", report, indent=1, sort_keys=True)
    md = markdown(report)
    atomic_write_text(out / "gpu.md", md)
    print(md)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0 if ok else 1


def _verdict(report: dict) -> bool:
    parts = report["parts"]
    corr = parts.get("correctness", {}).get("result")
    res = parts.get("resume", {}).get("result")
    errors = [p for p in parts.values() if "error" in p]
    return not errors and bool(corr) and all(r["ok"] for r in corr) and bool(res and res.get("ok"))


LAYER_COLUMNS = ["dtype", "compile", "B", "E", "implementation", "fwd_ms", "fwdbwd_ms", "fwdbwd_vs_softmoe",
                 "fwd_roofline", "fwdbwd_roofline", "bound", "fwdbwd_frac_mm"]


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}; {report['seconds']:.0f} s; "
             f"{'PASS' if report.get('ok') else 'FAIL'}" + (" (--smoke)" if report["smoke"] else ""), ""]
    for name, part in report["parts"].items():
        lines.append(f"## {name}")
        lines.append("")
        if "skipped" in part or "error" in part:
            lines += [f"{part.get('skipped') or part['error']}", ""]
            continue
        r = part["result"]
        if name == "correctness":
            lines.append(markdown_table(["dtype", "impl", "fwd_rel_err", "grad_rel_err", "worst_grad", "tolerance",
                                         "ok"], r))
        elif name == "layer":
            lines.append(markdown_table(LAYER_COLUMNS, r))
        elif name == "training":
            lines.append(markdown_table(["model", "batch", "img_size", "bf16", "img_per_s"], r))
            if len(r) == 2 and r[1]["img_per_s"]:
                lines += ["", f"{r[0]['model']} / {r[1]['model']} img/s: {r[0]['img_per_s'] / r[1]['img_per_s']:.2f}"]
        else:
            lines.append(markdown_table(list(r), [r]))
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from softmoe.bench import gpu

    parser = argparse.ArgumentParser(prog="softmoe bench gpu", description=gpu.__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
