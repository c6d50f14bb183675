"""`softmoe inspect`: routing analysis of a checkpoint (dispatch heatmaps, slot and expert
statistics), see softmoe.eval.inspect."""
from __future__ import annotations

import argparse

from softmoe._tables import text_table

MAX_PRINTED_ROWS = 16  # longer tables are summarised on screen; the CSV files hold every row
MAX_GRID_IMAGES = 32  # heatmap rows: each takes about a second to draw, and more are unreadable
MAX_GRID_SLOTS = 16  # heatmap columns per layer, for the same reasons


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "inspect", help="routing analysis: dispatch heatmaps, slot/expert statistics",
        description="Inspect the routing of a MoE checkpoint on test images: a PNG grid of Soft MoE dispatch "
                    "weights over the image patches for chosen slots, per-slot and per-expert statistics "
                    "(table, JSON, CSV). Tokens/Experts Choice layers get their expert load statistics.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="training workdir (latest checkpoint), checkpoints/step_* dir, save_pretrained dir, or the "
                        "name of a shipped model (`softmoe models --pretrained`)")
    p.add_argument("--data", default=None, metavar="NAME",
                   help="dataset name or ImageFolder directory (default: the one recorded in the workdir)")
    p.add_argument("--data-root", default=None, metavar="DIR")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=4,
                   help=f"images drawn in the heatmap grid (default 4, at most {MAX_GRID_IMAGES})")
    p.add_argument("--stats-images", type=int, default=256,
                   help="images the statistics average over (default 256, at most the split size)")
    p.add_argument("--slots", default="auto",
                   help="slots to draw: a list like 0,1,2,3, or 'auto' (the 4 most peaked) / 'auto:K'")
    p.add_argument("--layers", default="all",
                   help="Soft MoE layers to draw: 'all', or indices among them (0 = first) or module names")
    p.add_argument("--seed", type=int, default=0, help="seed of the image choice")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--download", action="store_true")
    p.add_argument("--out", default="inspect", metavar="DIR", help="output directory (default: ./inspect)")
    p.set_defaults(func=run)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_table(rows: list[dict], keys: list[str], sort_key: str | None = None) -> None:
    if len(rows) > MAX_PRINTED_ROWS and sort_key:
        shown = sorted(rows, key=lambda r: r[sort_key], reverse=True)
        rows = shown[:MAX_PRINTED_ROWS // 2] + shown[-MAX_PRINTED_ROWS // 2:]
        print(f"  ({len(shown)} rows; the {MAX_PRINTED_ROWS // 2} highest and lowest by {sort_key}; all in the CSV)")
    print(text_table([[_fmt(r[k]) for k in keys] for r in rows], header=keys))


def _print_layer(s: dict) -> None:
    if s["kind"] == "soft":
        print(f"\n{s['name']}  SoftMoE: {s['num_experts']} experts x {s['slots_per_expert']} slots, "
              f"{s['num_tokens']} tokens, {s['tokens_inspected']} tokens inspected")
    elif s["kind"] == "tokens_choice":
        print(f"\n{s['name']}  TokensChoiceMoE: {s['num_experts']} experts, k={s['k']}, {s['num_tokens']} tokens")
    elif s["kind"] == "experts_choice":
        print(f"\n{s['name']}  ExpertsChoiceMoE: {s['num_experts']} experts, capacity {s['capacity']}, "
              f"{s['num_tokens']} tokens")
    else:
        print(f"\n{s['name']}  {s.get('message', s['type'])}")
        return
    for k, v in s["metrics"].items():
        print(f"  {k:<34} {v:.4f}")
    if s["kind"] == "soft":
        print("  per slot (dispatch over tokens):")
        _print_table(s["slots"], ["slot", "expert", "dispatch_entropy", "dispatch_entropy_normalized", "dispatch_max"],
                     "dispatch_max")
        print("  per expert:")
        _print_table(s["experts"], ["expert", "combine_mass", "top_combine_tokens", "top_combine_fraction"],
                     "combine_mass")
    elif s["kind"] == "tokens_choice":
        print("  per expert (load = kept assignments per token):")
        _print_table(s["experts"], ["expert", "load", "choices", "mean_gate"], "load")
    else:
        print("  per expert:")
        _print_table(s["experts"], ["expert", "selected_gate_mean", "mean_gate"], "selected_gate_mean")


def _check_choices(model, slots: str, layers: str) -> None:
    """--layers and --slots checked against the model's layers before any statistics are
    computed (the same rules as the report uses later, on a skeleton of each layer)."""
    from softmoe.eval.inspect import choose_slots, select_layers
    from softmoe.layers import SoftMoE, moe_layers

    skeleton = [{"name": name, "kind": "soft" if isinstance(m, SoftMoE) else "sparse",
                 "slots": [{"dispatch_entropy": 0.0}] * (m.num_slots if isinstance(m, SoftMoE) else 0)}
                for name, m in moe_layers(model)]
    for layer in select_layers(skeleton, layers):
        if len(choose_slots(layer, slots)) > MAX_GRID_SLOTS:
            raise ValueError(f"--slots draws at most {MAX_GRID_SLOTS} slots per layer, got {slots!r}")
    auto_k = slots.strip().lower().partition(":")[2]
    if auto_k.isdigit() and int(auto_k) > MAX_GRID_SLOTS:
        raise ValueError(f"--slots 'auto:K' draws at most {MAX_GRID_SLOTS} slots per layer, got {slots!r}")


def run(args: argparse.Namespace) -> int:
    import torch

    from softmoe._device import resolve_device
    from softmoe._io import check_output_dir
    from softmoe.data import load_dataset
    from softmoe.eval.inspect import inspect_model
    from softmoe.eval.loading import load_checkpoint, make_prepare, resolve_data
    from softmoe.layers import moe_layers

    for name in ("images", "stats_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.images > MAX_GRID_IMAGES:
        raise ValueError(f"--images must be <= {MAX_GRID_IMAGES} (one heatmap row per image), got {args.images}; "
                         f"--stats-images sets how many images the statistics use")
    check_output_dir(args.out, "--out")
    device = resolve_device(args.device, arg="--device")
    model, train_cfg = load_checkpoint(args.checkpoint)
    if not any(True for _ in moe_layers(model)):
        raise ValueError(f"the model in {args.checkpoint} has no MoE layer (a dense ViT?): nothing to inspect")
    _check_choices(model, args.slots, args.layers)
    data, root = resolve_data(args.data, args.data_root, train_cfg)
    ds = load_dataset(data, args.split, root, args.download)
    model.to(device)
    prepare = make_prepare(model, ds.channels)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(ds), generator=gen)
    n_stats = min(args.stats_images, len(ds))
    n_plot = min(args.images, len(ds))
    stats_idx, plot_idx = order[:n_stats], order[:n_plot]
    row_labels = [f"{ds.classes[int(ds.labels[i])]} (#{int(i)})" for i in plot_idx]
    report = inspect_model(model, ds.images[stats_idx], ds.images[plot_idx], args.out, slots=args.slots,
                           layers=args.layers, batch_size=args.batch_size, row_labels=row_labels, prepare=prepare)

    name = getattr(model.config, "name", type(model).__name__)
    print(f"checkpoint {args.checkpoint}: model {name}; data {data}/{args.split}: statistics over {n_stats} "
          f"images (seed {args.seed}), heatmaps of {n_plot}")
    for s in report["layers"]:
        _print_layer(s)
        if "plotted_slots" in s:
            print(f"  drawn slots: {s['plotted_slots']}")
    for m in report["messages"]:
        print(f"note: {m}")
    print("\nwrote " + ", ".join(report["files"]))
    return 0
