"""`softmoe compare`: train a family of models at matched cost on one dataset, several seeds
each, and report what the runs support.

    from softmoe.compare import compare
    report = compare("digits", out_dir="runs/cmp", models="dense,soft,tc1", seeds=3, steps=300)

Parts: `family` (which models, sized to match the dense model's FLOPs), `runner` (one
resumable `softmoe train` work directory per model and seed, run in worker processes),
`stats` (mean ± std, difference to dense with its standard error, the verdict rule),
`report` (Markdown + JSON + PNG).
"""
from __future__ import annotations

import math
from pathlib import Path

from .family import DEFAULT_MODELS, MODELS, build_family, parse_models
from .runner import default_jobs, parse_seeds
from .speed import measure_speed
from .stats import difference, summarize

__all__ = ["compare", "MODELS", "DEFAULT_MODELS", "build_family", "parse_models", "parse_seeds", "summarize",
           "difference"]

# Images per Tokens/Experts Choice routing group, at most (see family.build_family).
MAX_GROUP = 8


def sparse_group_size(batch_sizes: list[int], limit: int = MAX_GROUP) -> int:
    """The largest power of two <= `limit` dividing every batch size the runs will see."""
    g = limit
    while g > 1 and any(b % g for b in batch_sizes if b):
        g //= 2
    return g


def compare(data: str, out_dir: str | Path = "runs/compare", *, data_root: str | None = None, base: str = "micro",
            models: str | None = None, seeds="3", ablation_seeds=None, epochs: float = 0.0, steps: int = 0,
            experts: int | None = None, flops_tolerance: float = 0.05, backbone: dict | None = None,
            overrides: list[str] | None = None, jobs: int | None = None, threads: int = 1,
            command: str = "", report_only: bool = False, recipe=None, arm_seeds: dict | None = None,
            records_dir: str | Path | None = None, log=print) -> dict:
    """Run (or resume) a comparison and write its report; returns the report dict.

    The recipe is the `cifar10`-style TrainConfig defaults with `epochs`/`steps` and the
    `overrides` (`key=value` strings, as `softmoe train --set`), identical for every model;
    `backbone` holds ViTConfig overrides shared by every model (e.g. {"patch_size": 8}).
    `ablation_seeds` (a count or list, as `seeds`): the seeds of the ablations and controls,
    when they should get fewer runs than the main models (dense, soft, tc1, tc2, ec).
    `recipe`: a TrainConfig to start from instead of TrainConfig's defaults (its model, seed
    and workdir are replaced; its length is kept unless `epochs`/`steps` is given)."""
    import dataclasses

    from softmoe.data import load_dataset
    from softmoe.train import TrainConfig, apply_overrides

    from . import report as report_mod
    from .runner import check_plan, plan_runs, run_all

    keys = parse_models(models)
    seed_list = parse_seeds(seeds)
    extra = parse_seeds(ablation_seeds) if ablation_seeds is not None else seed_list
    per_arm = {k: parse_seeds(v) for k, v in (arm_seeds or {}).items()}
    if set(per_arm) - set(keys):
        raise ValueError(f"--arm-seeds names arm(s) {sorted(set(per_arm) - set(keys))} that --models does not list "
                         f"({list(keys)})")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a directory")
    for o in overrides or []:
        key = str(o).split("=", 1)[0].strip().split(".")[0]
        if key in ("model", "model_kwargs", "seed", "workdir", "num_threads"):
            raise ValueError(f"--set {key}=... is chosen by compare itself (use --models/--backbone, --seeds, --out, "
                             f"--threads)")
    cfg = recipe if recipe is not None else TrainConfig()
    length = {"steps": steps, "epochs": epochs} if (steps or epochs) else {}
    cfg = dataclasses.replace(cfg, data=data, data_root=data_root, num_threads=threads, plots=False,
                              tensorboard=False, checkpoint_every=0, keep_checkpoints=1, **length)
    cfg = apply_overrides(cfg, list(overrides or [])).validate()
    # The data decide the image size, channels and classes (as the trainer does); the FLOP
    # matching needs them now.
    train_ds = load_dataset(cfg.data, "train", root=cfg.data_root, download=cfg.download)
    if cfg.val_split:  # the runs train on the rest (as the trainer splits it)
        from softmoe.data import split_train_val

        train_ds, val_ds = split_train_val(train_ds, cfg.val_split)
    test_ds = load_dataset(cfg.data, cfg.test_split, root=cfg.data_root, download=cfg.download)
    eval_sizes = [len(test_ds)] + ([len(val_ds)] if cfg.val_split else [])
    steps_per_epoch = len(train_ds) // cfg.batch_size
    total = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
    if not cfg.checkpoint_every:  # resumable: a checkpoint about every tenth of a run
        cfg = dataclasses.replace(cfg, checkpoint_every=max(1, total // 10))
    img = cfg.img_size or max(train_ds.image_size)
    shared = {"img_size": img, "in_chans": train_ds.channels, "num_classes": train_ds.num_classes,
              **dict(backbone or {})}
    group = sparse_group_size([cfg.batch_size, cfg.eval_batch_size, *(n % cfg.eval_batch_size for n in eval_sizes)])
    specs, matching = build_family(base, keys, shared, experts, flops_tolerance, group)
    seeds_of = {s.key: per_arm.get(s.key, seed_list if s.key in DEFAULT_MODELS else extra) for s in specs}
    runs = plan_runs(specs, seeds_of, cfg, out_dir, Path(records_dir) if records_dir else None)
    jobs = jobs or default_jobs(cfg.device, threads)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be an integer >= 1, got {jobs!r}")
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "seed", "workdir")}
    plan = {"data": cfg.data, "models": [s.to_dict() for s in specs], "matching": matching, "seeds": seed_list,
            "ablation_seeds": extra, "arm_seeds": {k: v for k, v in seeds_of.items()},
            "recipe": recipe, "steps": total, "train_images": total * cfg.batch_size,
            "command": command or "softmoe.compare.compare(...)", "jobs": jobs, "threads": threads}
    # jobs and the command's spelling may change on resume (they do not change what is trained).
    check_plan(out_dir, {k: v for k, v in plan.items() if k not in ("jobs", "command")})
    log(f"compare: {len(specs)} models, {len(runs)} runs of {total} steps on {cfg.data}; "
        f"{matching['matching']}; {jobs} at a time, {threads} thread(s) each; output {out_dir}")
    for s in specs:
        log(f"  {s.key:22s} {s.params / 1e6:7.2f}M params  {s.flops / matching['dense_flops']:6.3f}x dense FLOPs  "
            f"{s.description}")
    records = run_all(runs, jobs, log, report_only=report_only)
    if not records:
        raise ValueError(f"--report-only: no run in {str(out_dir)!r} is complete yet")
    plan["missing_runs"] = [f"{r.key} seed {r.seed}" for r in runs
                            if not any(x["key"] == r.key and x["seed"] == r.seed for x in records)]
    speed = measure_speed(specs, cfg.batch_size, threads, cfg.device, log=log)
    report = report_mod.write(out_dir, plan, records, speed)
    log(report_mod.markdown(report).split("## Routing")[0].split("## Every run")[0].rstrip())
    log(f"\nreport: {out_dir / report_mod.REPORT_MD} (+ {report_mod.REPORT_JSON}, plots)")
    return report
