"""`softmoe info NAME`: one model's config, block list (dense or MoE) and parameter / FLOP
breakdown, computed on the meta device (nothing is allocated)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "info", help="show a model's config, blocks and parameter/FLOP breakdown",
        description="Show one model's structure: its config, which blocks are MoE, and where its parameters and "
                    "inference FLOPs per image go. NAME is a registered model or a save_pretrained directory "
                    "(only its config.json is read).")
    p.add_argument("name", help="registered model name (see `softmoe models`) or a save_pretrained directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, VALUE parsed as JSON if possible (e.g. --set num_experts=256); repeatable")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=run)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string, e.g. moe_type=soft
    return out


def _config_for(name: str, overrides: dict):
    from softmoe.models import ViTConfig, get_config

    path = Path(name)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is a directory without config.json (not a save_pretrained directory)")
        try:
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(cfg_file)!r} is not valid JSON: {e}") from e
        cfg = ViTConfig.from_dict(data["config"] if "config" in data else data)
        return cfg.replace(**overrides) if overrides else cfg
    return get_config(name, **overrides)


def run(args: argparse.Namespace) -> int:
    import torch

    from softmoe.cli.models import format_count
    from softmoe.models import build_model, profile_model

    cfg = _config_for(args.name, parse_overrides(args.overrides))
    prof = profile_model(cfg)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
        return 0
    with torch.device("meta"):
        model = build_model(cfg)
    print(f"{cfg.name}: {format_count(prof.params)} parameters, {prof.flops / 1e9:.4g} GFLOP/img "
          f"({cfg.img_size}x{cfg.img_size}, {cfg.num_tokens} tokens, multiply-add = 2)")
    print("\nconfig:")
    for key, value in cfg.to_dict().items():
        print(f"  {key}: {json.dumps(value)}")
    print("\nblocks:")
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        n = sum(p.numel() for p in block.parameters())
        kind = "dense MLP" if type(mlp).__name__ == "Mlp" else f"{type(mlp).__name__}({mlp.extra_repr()})"
        print(f"  {i:>3}  {format_count(n):>9}  {kind}")
    for title, parts, total in (("parameters", prof.param_breakdown, prof.params),
                                ("FLOPs per image", prof.flop_breakdown, prof.flops)):
        print(f"\n{title}:")
        for key, value in parts.items():
            if value:
                print(f"  {key:<22} {format_count(value):>9}  {100 * value / total:6.2f}%")
        print(f"  {'total':<22} {format_count(total):>9}")
    return 0
