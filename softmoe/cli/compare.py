"""`softmoe compare`: train dense, Soft MoE and the sparse baselines at matched cost on one
dataset, several seeds each, and write a report (Markdown + JSON + plots)."""
from __future__ import annotations


def register(subparsers) -> None:
    from softmoe.compare.family import DESCRIPTIONS

    models = "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
    p = subparsers.add_parser(
        "compare", help="train a family of models at matched FLOPs over seeds and report the differences",
        description=__doc__ + "\n\nModels (--models, comma-separated, or 'all'; dense is always included): "
                    + models + ". Every run is an ordinary `softmoe train` work directory under OUT/runs/; "
                    "rerunning the same command resumes a killed comparison and runs only what is missing.")
    p.add_argument("--task", choices=("classify", "lm"), default="classify",
                   help="classify (ViTs on images, the default) or lm (decoders on a corpus: held-out bits per "
                        "character, softmoe/compare/lm.py)")
    p.add_argument("--config", default="charlm",
                   help="--task lm: the training config (a configs/ name or .py file with task='lm'; default charlm)")
    p.add_argument("--data", default=None,
                   help="a dataset name (digits, cifar10, ...) or an ImageFolder directory (--task classify)")
    p.add_argument("--data-root", default=None, help="where the dataset's files are")
    p.add_argument("--base", default="micro", help="the dense backbone: 'micro' or a vit_* model name (default: micro)")
    p.add_argument("--backbone", action="append", default=[], metavar="KEY=VALUE",
                   help="a ViTConfig override shared by every model, e.g. --backbone patch_size=8 (repeatable)")
    p.add_argument("--models", default=None,
                   help="models to train (default: dense,soft,tc1,tc2,ec); an arm may carry layer options, "
                        "MODEL:KEY=VALUE[:KEY=VALUE], e.g. soft:normalize=false (MoEConfig fields; ViTConfig for "
                        "dense). --task lm: decoder names with GPTConfig options, the first one dense (default: "
                        "gpt_micro,soft_moe_gpt_micro,soft_moe_gpt_micro:rotate=false)")
    p.add_argument("--seeds", default="3", help="a count (3 -> seeds 0,1,2) or a list '0,1,2' (default: 3)")
    p.add_argument("--ablation-seeds", default=None,
                   help="seeds of the ablations and controls, when fewer than --seeds (a count or a list)")
    p.add_argument("--arm-seeds", action="append", default=[], metavar="ARM=SEEDS",
                   help="the seeds of one arm, e.g. --arm-seeds soft:normalize=false=5 (a count or a list after the "
                        "last '='; repeatable)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=None, help="training epochs per run")
    length.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--experts", type=int, default=None,
                   help="experts of the MoE models (default: the Soft MoE count matching dense FLOPs)")
    p.add_argument("--flops-tolerance", type=float, default=0.05,
                   help="largest relative FLOP difference of Soft MoE to dense when matching (default: 0.05)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a training-recipe field, as `softmoe train --set` (the same for every model; repeatable)")
    p.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p.add_argument("--records", default=None, metavar="DIR",
                   help="also write each finished run's record to DIR/<arm>/seed<k>.json (commit it); runs whose "
                        "record is there are skipped, on any machine")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time (default: cores / threads on CPU, 1 on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs complete so far (it lists the missing ones)")
    p.set_defaults(func=run)


def run(args) -> int:
    import shlex
    import sys

    from softmoe.compare import compare

    if args.task == "lm":
        return _run_lm(args)
    if args.data is None:
        raise ValueError("--data is required for --task classify (a dataset name or an ImageFolder directory)")
    if args.epochs is None and args.steps is None:
        raise ValueError("give --epochs or --steps (the training length of every run)")
    backbone = _backbone(args.backbone)
    compare(args.data, args.out, data_root=args.data_root, base=args.base, models=args.models, seeds=args.seeds,
            ablation_seeds=args.ablation_seeds, arm_seeds=_arm_seeds(args.arm_seeds),
            records_dir=args.records,
            epochs=args.epochs or 0.0, steps=args.steps or 0, experts=args.experts,
            flops_tolerance=args.flops_tolerance, backbone=backbone, overrides=args.overrides, jobs=args.jobs,
            threads=args.threads, report_only=args.report_only, command="softmoe " + shlex.join(sys.argv[1:]))
    return 0


def _run_lm(args) -> int:
    import shlex
    import sys

    from softmoe.compare.lm import compare_lm

    vision_only = {"--data": args.data, "--data-root": args.data_root, "--epochs": args.epochs,
                   "--experts": args.experts, "--ablation-seeds": args.ablation_seeds,
                   "--backbone": args.backbone or None, "--arm-seeds": args.arm_seeds or None}
    given = [k for k, v in vision_only.items() if v is not None]
    if given or args.base != "micro":
        raise ValueError(f"{', '.join(given or ['--base'])}: not used by --task lm (the corpus and model come from "
                         f"--config and --models; the length from --steps or the config)")
    if args.jobs not in (None, 1):
        raise ValueError(f"--task lm runs one run at a time (--jobs 1), got --jobs {args.jobs}")
    compare_lm(args.config, args.out, models=args.models, seeds=args.seeds, steps=args.steps or 0,
               overrides=args.overrides, threads=args.threads, flops_tolerance=args.flops_tolerance,
               records_dir=args.records, report_only=args.report_only,
               command="softmoe " + shlex.join(sys.argv[1:]))
    return 0


def _backbone(items: list[str]) -> dict:
    """`["patch_size=8", ...]` -> {"patch_size": 8}; values parsed as JSON, else strings.
    The keys are checked against the model config when the family is built."""
    import json

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--backbone expects KEY=VALUE (a model config field), got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _arm_seeds(items: list[str]) -> dict:
    """`["soft:normalize=false=5"]` -> {"soft:normalize=false": "5"} (split at the last '=')."""
    out = {}
    for item in items:
        arm, sep, seeds = item.rpartition("=")
        if not sep or not arm.strip() or not seeds.strip():
            raise ValueError(f"--arm-seeds expects ARM=SEEDS (e.g. soft_identity=2), got {item!r}")
        out[arm.strip()] = seeds.strip()
    return out
