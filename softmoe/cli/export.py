"""`softmoe export RUN_OR_CHECKPOINT OUT`: one `model.safetensors` + `config.json` (a
save_pretrained directory, what `from_pretrained` and `softmoe eval` read) from a training run,
offline, in one process. The usual source is a parallel run's DCP checkpoint (checkpoints/step_N/
with dcp/ and config.json, written shard by shard at any layout): the model is built from
config.json on the meta device, allocated once on the CPU and every tensor read from the shards,
without any process group. A single-process checkpoint or a save_pretrained directory is copied
through the same path."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint (a parallel run's DCP shards) as one model.safetensors + config.json",
        description="Export a training run's latest checkpoint, a checkpoints/step_* directory (DCP shards of a "
                    "parallel run, or a single-process checkpoint) or a save_pretrained directory to OUT as "
                    "model.safetensors + config.json (from_pretrained / softmoe eval read it). Offline, one process.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="training workdir (its latest checkpoint), checkpoints/step_* directory or save_pretrained dir")
    p.add_argument("out", metavar="OUT", help="output folder (created if missing; its model files are replaced)")
    p.set_defaults(func=run, prechecks=[_check_args])


def _check_args(args: argparse.Namespace) -> None:
    from pathlib import Path

    from softmoe._io import check_output_dir
    from softmoe.eval.loading import check_model_dir

    src = check_model_dir(args.source, "RUN_OR_CHECKPOINT")
    out = Path(args.out)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"OUT {args.out!r} must lie outside RUN_OR_CHECKPOINT {args.source!r}")
    check_output_dir(out, "OUT")


def run(args: argparse.Namespace) -> int:
    from softmoe.models.hub import load_model, save_pretrained

    model, _ = load_model(args.source)
    out = save_pretrained(model, args.out)
    n = sum(p.numel() for p in model.state_dict().values())
    print(f"exported {args.source} -> {out} ({len(model.state_dict())} tensors, {n / 1e6:.2f}M numbers)")
    return 0
