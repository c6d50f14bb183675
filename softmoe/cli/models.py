"""`softmoe models [PATTERN]`: the registered models with their parameters and inference
FLOPs, counted on the meta device (nothing is allocated): the vision models (task classify,
FLOPs per image), then the decoders (task lm, FLOPs per sequence of block_size tokens) in a
section of their own."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list registered models with parameters and GFLOP/img",
        description="List the registered models matching PATTERN (shell wildcards, default '*') with parameters, "
                    "inference GFLOP per image (multiply-add = 2), MoE layers and experts, at the default image size; "
                    "then the decoders (task lm) with GFLOP per sequence of their context length.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern, e.g. 'soft_moe_*' (default: all)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="count with this head size (the paper's Table 8 uses 29593; default: each model's own)")
    p.add_argument("--img-size", type=int, default=None, help="count at this image size (default: each model's own)")
    p.add_argument("--pretrained", action="store_true",
                   help="list the trained models that ship with softmoe (from_pretrained(NAME) loads them offline)")
    p.set_defaults(func=run)


def format_count(n: float) -> str:
    """215.3K / 933.7M / 27.32B: thousands below 1M, millions below 10B, else billions."""
    if n < 1e6:
        return f"{n / 1e3:.1f}K"
    return f"{n / 1e9:.2f}B" if n >= 1e10 else f"{n / 1e6:.1f}M"


def format_gflop(flops: float) -> str:
    g = flops / 1e9
    return f"{g:.2f}" if g >= 1 else f"{g:.4f}"


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        return _print_pretrained(args.pattern)
    from softmoe.models import list_models, profile_model

    names, decoders = list_models(args.pattern), list_models(args.pattern, task="lm")
    if not names and not decoders:
        print(f"softmoe models: no model matches {args.pattern!r}; try `softmoe models` for the full list",
              file=sys.stderr)
        return 1
    rows = []
    for name in names:
        prof = profile_model(name, num_classes=args.num_classes, img_size=args.img_size)
        cfg = prof.config
        rows.append([name, format_count(prof.params), format_gflop(prof.flops), str(cfg.img_size),
                     str(len(cfg.moe_blocks)) if cfg.moe_type else "-",
                     str(cfg.num_experts) if cfg.moe_type else "-", cfg.moe_type or "dense"])
    if rows:
        _print_table(["name", "params", "GFLOP/img", "img", "MoE layers", "experts", "type"], rows)
    lm_rows = []
    for name in decoders:  # --num-classes / --img-size do not apply to a decoder
        prof = profile_model(name)
        cfg = prof.config
        lm_rows.append([name, format_count(prof.params), format_gflop(prof.flops), str(cfg.block_size),
                        str(len(cfg.moe_blocks)) if cfg.moe_type else "-",
                        str(cfg.num_experts) if cfg.moe_type else "-", cfg.moe_type or "dense"])
    if lm_rows:
        if rows:
            print()
        print("decoders (task lm; GFLOP per sequence of ctx tokens):")
        _print_table(["name", "params", "GFLOP/seq", "ctx", "MoE layers", "experts", "type"], lm_rows)
    return 0


def _print_pretrained(pattern: str) -> int:
    """The shipped models matching `pattern`, with the accuracy their cards record."""
    import fnmatch

    from softmoe.models import list_pretrained

    cards = {n: c for n, c in list_pretrained().items() if fnmatch.fnmatchcase(n, pattern)}
    if not cards:
        print(f"softmoe models --pretrained: no shipped model matches {pattern!r}", file=sys.stderr)
        return 1
    rows = [[name, c["model"], c["data"], str(c["steps"]), f"{100 * c['val_accuracy']:.2f}",
             f"{100 * c['test_accuracy']:.2f}", c["description"]] for name, c in cards.items()]
    _print_table(["name", "model", "data", "steps", "val top-1 %", "test top-1 %", "what"], rows)
    print("\nfrom_pretrained(NAME) or `softmoe eval --checkpoint NAME` loads one offline; the recipe and the "
          "study they come from: docs/results.md")
    return 0


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    right = {1, 2, 3, 4, 5}

    def fmt(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(fmt(header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt(r))
