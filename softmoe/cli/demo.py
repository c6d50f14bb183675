"""`softmoe demo`: train a small Soft MoE ViT and the matching dense ViT on the embedded digits
dataset (no download, about two minutes on 2 CPU cores) and compare their test accuracy."""
from __future__ import annotations



def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train Soft MoE and dense micro ViTs on digits (~2 min on CPU)",
                              description=__doc__)
    p.add_argument("--workdir", default="runs/demo", help="parent work directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default: the tuned preset)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1, fastest for these sizes)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os
    import time

    from softmoe.train import train
    from softmoe.train.presets import DEMO_STEPS, demo_config

    steps = args.steps if args.steps is not None else DEMO_STEPS
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    results = []
    t0 = time.perf_counter()
    for model, sub in (("soft_moe_micro", "soft_moe"), ("vit_micro", "vit")):
        cfg = demo_config(model, workdir=os.path.join(args.workdir, sub), steps=steps)
        if args.threads is not None:
            cfg.num_threads = args.threads
        print(f"\n== {model} ==")
        results.append((model, train(cfg, cfg.workdir)))
    wall = time.perf_counter() - t0
    print(f"\n== demo results (digits, {steps} steps each, {wall:.0f} s in total) ==")
    width = max(len(m) for m, _ in results)
    for model, s in results:
        # A work directory that already holds the finished run is resumed at its last step:
        # nothing is trained again, so there is no speed to report.
        speed = f"{s['images_per_s']:5.0f} img/s" if s["images_per_s"] else "already trained"
        print(f"  {model.ljust(width)}  test accuracy {100 * s['test_accuracy']:6.2f}%  "
              f"{s['params'] / 1e6:5.2f}M params  {speed}  workdir {s['workdir']}")
    for model, s in results:
        print(f"  {model}: plots in {os.path.join(s['workdir'], 'plots')}, checkpoint {s['checkpoint']}")
    return 0
