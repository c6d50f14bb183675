"""`softmoe demo`: a miniature of `softmoe compare` on the embedded 8x8 digits (no download,
about two minutes on 2 CPU cores): a dense micro ViT and a Soft MoE at matched FLOPs, three
seeds each, one shared recipe, and the comparison's report table with a verdict that claims only
what the runs support. `--models dense,soft,tc1` adds Tokens Choice (about two minutes more: at 16
tokens per image its capacity rounding doubles its expert FLOPs)."""
from __future__ import annotations

# What the demo says after its table (docs/results.md holds the study it summarises).
def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="dense vs Soft MoE at matched FLOPs on digits, 3 seeds (~2 min on CPU)",
                              description=__doc__)
    p.add_argument("--workdir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: the preset, 800)")
    p.add_argument("--seeds", default="3", help="seeds per model: a count or a list (default: 3)")
    p.add_argument("--models", default="dense,soft", help="models to compare (default: dense,soft; or dense,soft,tc1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1, fastest at this size)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from softmoe.compare import compare
    from softmoe.train.presets import DEMO_STEPS, demo_config

    steps = args.steps if args.steps is not None else DEMO_STEPS
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    report = compare("digits", args.workdir, models=args.models, seeds=args.seeds, steps=steps,
                     backbone={"patch_size": 2}, recipe=demo_config("vit_micro", steps=steps), threads=args.threads,
                     command=f"softmoe demo --workdir {args.workdir} --steps {steps} --seeds {args.seeds} "
                             f"--models {args.models}")
    from softmoe.compare import report as report_mod

    # compare printed the cost and results tables; the demo adds what the router did.
    for section in report_mod.markdown(report).split("\n## ")[1:]:
        if section.startswith("Routing"):
            print("\n## " + section.rstrip())
    soft = next((m for m in report["models"] if m["key"] == "soft"), None)
    print(f"\n== demo: digits, {steps} steps per run, {time.perf_counter() - t0:.0f} s ==")
    if soft is not None:
        print(f"Soft MoE vs dense on digits: {soft['vs_dense']['words']}.")
    from softmoe.compare.findings import study_finding

    print("Digits (1,438 training images) is data-bound: a verdict here says little about larger data.")
    print(study_finding())  # generated from the committed results, docs/results/
    return 0
