"""softmoe's layer at two checkouts, side by side in one run:
`python benchmarks/ab_layer.py BASE NEW [--experts 8 128] [--repeats 15] [--port soft-moe] [--threads 2]`.

BASE and NEW are folders holding a checkout of softmoe (e.g. one made with `git worktree add`).
Each gets a benchmark worker process started in its folder, so each imports its own code
(softmoe.bench.layer.workers.Worker); a third worker runs the port. The three are timed
round-robin, one training step (forward + backward at the paper's S/16 layer shape, B=32,
N=196, D=384, H=1536, P=1, float32) per round, after 2 warm-up rounds, exactly as
`softmoe bench layer` times. Printed per E: the fwd+bwd medians, the median of the per-round
ratios BASE / NEW, and the port's median over each.

Why: on a shared VM absolute times move by 20-30% between runs of the same code; whether a
change keeps (or gains) speed is read from ratios measured in one run, round by round.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from softmoe.bench.layer.impls import IMPLS
from softmoe.bench.layer.shape import Shape
from softmoe.bench.layer.workers import Worker


def checkout(path: str) -> str:
    folder = Path(path)
    if not (folder / "softmoe" / "bench" / "layer" / "workers.py").is_file():
        raise argparse.ArgumentTypeError(f"expected a folder holding a softmoe checkout "
                                         f"(with softmoe/bench/layer/workers.py), got {path!r}")
    folder = folder.resolve()
    # the worker imports whatever `import softmoe` finds from that folder: make sure it is its own
    found = subprocess.run([sys.executable, "-c", "import softmoe; print(softmoe.__file__)"], cwd=folder,
                           capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).is_relative_to(folder):
        raise argparse.ArgumentTypeError(f"`import softmoe` started in {path!r} does not import that checkout "
                                         f"(got {found.stdout.strip() or found.stderr.strip()[-300:]!r})")
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ab_layer.py", description=__doc__.splitlines()[0])
    parser.add_argument("base", type=checkout, help="folder of the first checkout")
    parser.add_argument("new", type=checkout, help="folder of the second checkout")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 128], help="values of E (default 8 128)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per E (default 15)")
    parser.add_argument("--port", default="soft-moe", choices=[i.name for i in IMPLS if i.name != "softmoe"],
                        help="the implementation timed beside them (default soft-moe)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    args = parser.parse_args(argv)
    for name in ("experts", "repeats", "threads"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name} must be at least 1, got {values}")
    print(f"torch {torch.__version__}, {args.threads} threads per worker, {args.repeats} rounds after 2 warm-up")
    print(f"base: {args.base}\nnew:  {args.new}")
    print("| E | base fwd+bwd ms | new fwd+bwd ms | base / new (median per round) | "
          f"{args.port} ms | {args.port} / base | {args.port} / new |")
    print("|---|---|---|---|---|---|---|")
    for e in args.experts:
        s = Shape(batch=32, tokens=196, dim=384, experts=e, slots=1, hidden=1536)
        workers = {}
        try:
            workers = {"base": Worker("softmoe", s, args.threads, cwd=args.base),
                       "new": Worker("softmoe", s, args.threads, cwd=args.new),
                       "port": Worker(args.port, s, args.threads, cwd=args.new)}
            times = {k: [] for k in workers}
            for r in range(2 + args.repeats):
                for k, w in workers.items():
                    step = w.round()[1]
                    if r >= 2:
                        times[k].append(step)
        finally:
            for w in workers.values():
                w.close()
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        ratio = statistics.median(b / n for b, n in zip(times["base"], times["new"]))
        print(f"| {e} | {med['base']:.1f} | {med['new']:.1f} | {ratio:.3f} | {med['port']:.1f} | "
              f"{med['port'] / med['base']:.2f}x | {med['port'] / med['new']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
