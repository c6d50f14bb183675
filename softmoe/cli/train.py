"""`softmoe train --config NAME_OR_PATH [--set key=value ...] [--workdir DIR] [--resume]`."""
from __future__ import annotations



def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a config (configs/*.py)",
        description="Train a model. Configs are Python files defining config() -> TrainConfig; --set overrides "
                    "fields: model=NAME picks the model, model.KEY=VALUE overrides its config (e.g. "
                    "model.patch_size=2, model.moe.num_experts=16; model_kwargs.KEY=VALUE is the old spelling). "
                    "A work directory that holds a checkpoint is resumed automatically.")
    p.add_argument("--config", default="debug", metavar="NAME_OR_PATH",
                   help="a config name from configs/ (e.g. demo, debug, cifar10, paper_s16) or a .py file "
                        "(default: debug)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lr=3e-4 --set model.moe.num_experts=16 (repeatable)")
    p.add_argument("--workdir", default=None, help="work directory (default: the config's workdir)")
    p.add_argument("--resume", action="store_true",
                   help="require a checkpoint in the work directory and continue from it (done automatically "
                        "when one exists)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from softmoe.train import apply_overrides, load_config, train

    cfg = apply_overrides(load_config(args.config), args.overrides)
    if args.workdir:
        cfg.workdir = args.workdir
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    train(cfg, cfg.workdir, resume=True if args.resume else None, progress=False if args.no_progress else None)
    return 0
