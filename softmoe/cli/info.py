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
                   help="config override parsed by the field's type, e.g. --set moe.num_experts=256 (or "
                        "num_experts=256), --set num_classes=29593, --set moe=none (dense); repeatable")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.set_defaults(func=run)


def _decoder_config(name: str, items: list[str]):
    """The GPTConfig of a decoder name or a GPT save_pretrained directory, with `--set` items
    (GPTConfig fields; values as JSON, else strings); None when `name` is neither."""
    from softmoe._fields import split_assignment
    from softmoe.models import get_config, list_models
    from softmoe.models.hub import saved_architecture

    if Path(name).is_dir() and saved_architecture(name) == "gpt":
        from softmoe.models.gpt import GPTConfig

        cfg = GPTConfig.from_dict(json.loads((Path(name) / "config.json").read_text(encoding="utf-8"))["config"])
    elif name in list_models(task="lm"):
        cfg = get_config(name)
    else:
        return None
    overrides = {}
    for item in items:
        key, text = split_assignment(item)
        try:
            overrides[key] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key] = text
    return cfg.replace(**overrides)


def _config_for(name: str, overrides: dict):
    from softmoe.models import get_config
    from softmoe.models.hub import load_config
    from softmoe.models.registry import apply_overrides

    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"{name} is a directory without config.json (not a save_pretrained directory)")
        return apply_overrides(load_config(name), overrides)
    return get_config(name, **overrides)


def run(args: argparse.Namespace) -> int:
    import torch

    from softmoe.cli.models import format_count
    from softmoe.models import build_model, profile_model
    from softmoe.models.config import parse_overrides

    cfg = _decoder_config(args.name, args.overrides)
    if cfg is None:
        cfg = _config_for(args.name, parse_overrides(args.overrides))
    prof = profile_model(cfg)
    if args.json:
        print(json.dumps(prof.to_dict(), indent=2))
        return 0
    decoder = prof.task == "lm"
    with torch.device("meta"):
        if decoder:
            from softmoe.models.gpt import GPT

            model = GPT(cfg)
        else:
            model = build_model(cfg)
    if decoder:
        print(f"{cfg.name}: {format_count(prof.params)} parameters, {prof.flops / 1e9:.4g} GFLOP/seq "
              f"({cfg.block_size} tokens, multiply-add = 2; task lm)")
    else:
        print(f"{cfg.name}: {format_count(prof.params)} parameters, {prof.flops / 1e9:.4g} GFLOP/img "
              f"({cfg.img_size}x{cfg.img_size}, {cfg.num_tokens} tokens, multiply-add = 2)")
    print("\nconfig:")
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):  # the moe section
            print(f"  {key}:")
            for sub, v in value.items():
                print(f"    {sub}: {json.dumps(v)}")
        else:
            print(f"  {key}: {json.dumps(value)}")
    print("\nblocks:")
    for i, block in enumerate(model.blocks):
        mlp = block.mlp
        n = sum(p.numel() for p in block.parameters())
        kind = "dense MLP" if type(mlp).__name__ == "Mlp" else f"{type(mlp).__name__}({mlp.extra_repr()})"
        print(f"  {i:>3}  {format_count(n):>9}  {kind}")
    for title, parts, total in (("parameters", prof.param_breakdown, prof.params),
                                ("FLOPs per sequence" if decoder else "FLOPs per image", prof.flop_breakdown,
                                 prof.flops)):
        print(f"\n{title}:")
        for key, value in parts.items():
            if value:
                print(f"  {key:<22} {format_count(value):>9}  {100 * value / total:6.2f}%")
        print(f"  {'total':<22} {format_count(total):>9}")
    return 0
