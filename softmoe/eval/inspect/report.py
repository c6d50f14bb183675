"""The routing report of `softmoe inspect`: statistics plus heatmaps of a model, written as
dispatch_<layer>.png, routing.json, layers.csv, slots.csv and experts.csv."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..._io import atomic_write_text
from ..._tables import write_csv
from .plots import choose_slots, dispatch_maps, patch_grid, plot_dispatch_grid, select_layers
from .stats import routing_statistics


def inspect_model(model: nn.Module, stats_images: torch.Tensor, plot_images: torch.Tensor, out_dir,
                  slots: str | Sequence[int] = "auto", layers: str | None = None, batch_size: int = 64,
                  row_labels: Sequence[str] | None = None,
                  prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Routing report of `model`: statistics over `stats_images` (M, C, H, W) and, for each
    chosen Soft MoE layer, a PNG of the chosen slots' dispatch weights on `plot_images`
    (B, C, H, W); both model-ready, or mapped batch-wise to model input by `prepare`. Writes
    into `out_dir` (created): dispatch_<layer>.png, routing.json, layers.csv, slots.csv,
    experts.csv. Returns the report dict (its "files"
    lists what was written, "messages" what was skipped and why)."""
    out_dir = Path(out_dir)
    stats = routing_statistics(model, stats_images, batch_size, prepare)
    if prepare is not None:
        plot_images = prepare(plot_images)
    report: dict = {"num_stats_images": int(stats_images.shape[0]), "num_plot_images": int(plot_images.shape[0]),
                    "layers": stats, "files": [], "messages": []}
    for s in stats:
        if s["kind"] != "soft":
            report["messages"].append(f"{s['name']} ({s['type']}): no dispatch weights to draw (sparse routing); "
                                      f"expert load statistics only")
    chosen = select_layers(stats, layers)
    if not any(s["kind"] == "soft" for s in stats):
        report["messages"].append("the model has no Soft MoE layer: dispatch heatmaps skipped")
    out_dir.mkdir(parents=True, exist_ok=True)
    if chosen and plot_images.shape[0] > 0:
        maps = dispatch_maps(model, plot_images)
        for s in chosen:
            picked = choose_slots(s, slots)
            s["plotted_slots"] = picked
            d = maps[s["name"]]  # (B, N, S)
            rows, cols, _ = patch_grid(model, d.shape[1])
            P = s["slots_per_expert"]
            labels = [f"slot {k} (e{k // P}" + (f",p{k % P})" if P > 1 else ")") for k in picked]
            path = out_dir / f"dispatch_{s['name'].replace('.', '_') or 'layer'}.png"
            how = "auto: the most peaked slots" if isinstance(slots, str) and slots.startswith("auto") else "chosen"
            plot_dispatch_grid(plot_images, d, picked, (rows, cols), path, slot_labels=labels, row_labels=row_labels,
                               title=f"{s['name']}: dispatch weights of slots ({how})")
            report["files"].append(str(path))
    write_report(report, out_dir)
    return report


def write_report(report: dict, out_dir) -> None:
    """routing.json (everything), layers.csv (one row per layer: its metrics), slots.csv and
    experts.csv (one row per slot / expert of every layer; the columns are the union of the
    rows' keys, in order of appearance). Each written atomically."""
    out_dir = Path(out_dir)
    layer_rows, slot_rows, expert_rows = [], [], []
    for s in report["layers"]:
        base = {"layer": s["name"], "type": s["type"]}
        layer_rows.append({**base, **{k: v for k, v in s.items() if isinstance(v, (int, float)) and k != "name"},
                           **s.get("metrics", {})})
        slot_rows += [{**base, **r} for r in s.get("slots", [])]
        expert_rows += [{**base, **r} for r in s.get("experts", [])]
    tables = {"layers.csv": layer_rows, "slots.csv": slot_rows, "experts.csv": expert_rows}
    report["files"] += [str(out_dir / name) for name in (*tables, "routing.json")]
    for name, rows in tables.items():
        write_csv(out_dir / name, list(dict.fromkeys(k for r in rows for k in r)), rows)
    atomic_write_text(out_dir / "routing.json", json.dumps(report, indent=2) + "\n")
