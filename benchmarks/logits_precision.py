"""SoftMoE's `logits_dtype` options under autocast: error against float64, and speed.

    python benchmarks/logits_precision.py [--device cpu] [--dtype bf16] [--batch 8] [--experts 8 128]
                                          [--scales 1 10] [--repeats 5] [--threads 2]

For the paper's S/16 layer shape (N=196, D=384, H=1536, P=1) at each E and router scale (1 is
the initialisation, near-uniform routing; a larger scale sharpens the softmaxes as training
does): the max |error| / max |float64| of the logits, the dispatch and combine weights, the
output and the gradients of x and phi, with logits_dtype "float32" and "autocast", both under
--dtype autocast, against the float64 reference path with the same weights; then the median
fwd+bwd time of both options (interleaved rounds, one process, 2 warm-up rounds) and of the
float32 layer without autocast. Prints a Markdown table (docs/benchmarks.md records a run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from softmoe import SoftMoE

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def one_pass(layer: SoftMoE, x: torch.Tensor, dy: torch.Tensor, autocast: torch.dtype | None) -> dict:
    layer.zero_grad(set_to_none=True)
    layer.record_weights = True
    xg = x.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        y = layer(xg)
        logits = layer.router(xg.detach())
    y.backward(dy.to(y.dtype))
    w = layer.routing_weights
    return {"logits": logits.detach(), "dispatch": w["dispatch"], "combine": w["combine"], "y": y.detach(),
            "dx": xg.grad, "dphi": layer.router.phi.grad}


def timed(layer: SoftMoE, x: torch.Tensor, dy: torch.Tensor, autocast: torch.dtype | None) -> float:
    layer.record_weights = False
    layer.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
        y = layer(xg)
    y.backward(dy.to(y.dtype))
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=list(AUTOCAST))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 128])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev, ac = torch.device(a.device), AUTOCAST[a.dtype]
    N, D, H = 196, 384, 1536
    print(f"torch {torch.__version__}, {a.device}, {a.dtype} autocast, {a.threads} threads, B={a.batch}, "
          f"N={N}, D={D}, H={H}, P=1")
    print("\n| E | scale | logits_dtype | logits | dispatch | combine | y | dx | dphi |")
    print("|---|---|---|---|---|---|---|---|---|")
    speed = []
    for E in a.experts:
        for scale in a.scales:
            torch.manual_seed(0)
            base = SoftMoE(D, E, 1, H)
            with torch.no_grad():
                base.router.scale.fill_(scale)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(a.batch, N, D, generator=g).to(dev)
            dy = torch.randn(a.batch, N, D, generator=g).to(dev)
            ref = SoftMoE(D, E, 1, H, impl="reference").double().to(dev)
            ref.load_state_dict(base.state_dict())
            want = one_pass(ref, x.double(), dy.double(), None)
            layers = {}
            for option in ("float32", "autocast"):
                layer = SoftMoE(D, E, 1, H, logits_dtype=option).to(dev)
                layer.load_state_dict(base.state_dict())
                layers[option] = layer
                got = one_pass(layer, x, dy, ac)
                errors = " | ".join(f"{rel(got[k], want[k]):.1e}" for k in want)
                print(f"| {E} | {scale:g} | {option} | {errors} |")
            if scale == a.scales[0]:
                runs = {"float32": ("float32", ac), "autocast": ("autocast", ac), "fp32 layer": ("float32", None)}
                times = {k: [] for k in runs}
                for r in range(2 + a.repeats):
                    for k, (option, dt) in runs.items():
                        ms = timed(layers[option], x, dy, dt)
                        if r >= 2:
                            times[k].append(ms)
                speed.append((E, {k: statistics.median(v) for k, v in times.items()}))
    print(f"\n| E | fwd+bwd ms, {a.dtype}, logits float32 | {a.dtype}, logits autocast | fp32, no autocast |")
    print("|---|---|---|---|")
    for E, t in speed:
        print(f"| {E} | {t['float32']:.1f} | {t['autocast']:.1f} | {t['fp32 layer']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
