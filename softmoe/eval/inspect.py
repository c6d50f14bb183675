"""Routing analysis of a trained MoE model: what each Soft MoE slot looks at, how the
experts share the output, and the corresponding load statistics of sparse layers.

Soft MoE (weights from `SoftMoE.routing_weights`, each (B, N, E, P), flattened to S = E*P
slots in expert-major order: slot s = expert s // P, slot-in-expert s % P):
  per slot    dispatch entropy H_s = -sum_n D[n,s] log D[n,s] (mean over images; also / log N,
              1 = uniform over the tokens, 0 = one token), max and min dispatch weight;
  per expert  combine mass = mean over tokens of sum_p C[n,e,p] (sums to 1 over experts),
              top-combine tokens = tokens whose largest per-expert combine mass is this
              expert's (count over all inspected tokens, and fraction);
  per layer   combine entropy per token -sum_s C log C (mean; / log S), and vmoe's metrics
              combine_weights_{min,max}_mean (mean over tokens of the min/max over slots),
              dispatch_weights_{min,max}_mean (mean over slots of the min/max over tokens).
Tokens Choice: per-expert load (kept assignments / tokens), mean gate, the dropped fraction.
Experts Choice: per-expert mean selected gate, tokens processed by no expert, experts per token.

Statistics accumulate over batches, so any number of images can be inspected.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .._io import atomic_write, atomic_write_text
from ..layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, moe_layers, record_routing


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dim)


class _Acc:
    """Sums of tensors and a count, for means over batches."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float] = {}
        self.shape: tuple[int, int, int] = (0, 0, 0)  # (N, E, P|K|C) of the layer, set by the first batch

    def add(self, key: str, value: torch.Tensor, count: float) -> None:
        value = value.detach().double().cpu()
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0.0) + count

    def mean(self, key: str) -> torch.Tensor:
        return self.sums[key] / max(self.counts[key], 1.0)


def _soft_batch(acc: _Acc, layer: SoftMoE) -> None:
    w = layer.routing_weights
    B, N, E, P = w["dispatch"].shape
    d = w["dispatch"].reshape(B, N, E * P).double()  # (B, N, S)
    c = w["combine"].reshape(B, N, E * P).double()  # (B, N, S)
    acc.add("slot_dispatch_entropy", _entropy(d, 1).sum(0), B)  # (S,)
    acc.add("slot_dispatch_max", d.amax(1).sum(0), B)
    acc.add("slot_dispatch_min", d.amin(1).sum(0), B)
    mass = c.view(B, N, E, P).sum(-1)  # (B, N, E) per-expert combine mass of each token
    acc.add("expert_combine_mass", mass.sum((0, 1)), B * N)
    top = torch.bincount(mass.argmax(-1).flatten(), minlength=E).double()  # (E,)
    acc.add("expert_top_tokens", top, 1.0)  # a count: summed, never averaged
    acc.add("combine_entropy", _entropy(c, -1).sum(), B * N)
    acc.add("combine_weights_min_mean", c.amin(-1).sum(), B * N)
    acc.add("combine_weights_max_mean", c.amax(-1).sum(), B * N)
    acc.add("dispatch_weights_min_mean", d.amin(1).sum(), B * E * P)
    acc.add("dispatch_weights_max_mean", d.amax(1).sum(), B * E * P)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, P)


def _tc_batch(acc: _Acc, layer: TokensChoiceMoE) -> None:
    w = layer.routing_weights
    B, N, K = w["expert_index"].shape
    E = layer.num_experts
    idx, kept = w["expert_index"].flatten(), w["kept"].flatten()
    load = torch.zeros(E + 1, dtype=torch.float64).index_add_(0, idx.cpu(), kept.cpu().double())[:E]
    acc.add("expert_load", load, B * N)  # kept assignments per token
    acc.add("expert_choices", torch.bincount(idx.cpu().clamp_max(E), minlength=E + 1)[:E].double(), B * N)
    acc.add("expert_mean_gate", w["gates"].double().sum((0, 1)), B * N)
    acc.add("dropped_choices_fraction", (~kept).double().sum(), B * N * K)
    acc.add("tokens_unprocessed_fraction", (~w["kept"].any(-1)).double().sum(), B * N)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, K)


def _ec_batch(acc: _Acc, layer: ExpertsChoiceMoE) -> None:
    w = layer.routing_weights
    R, E, C = w["token_index"].shape
    B, N, _ = w["gates"].shape
    T = B * N // R  # tokens per group
    per_token = torch.zeros(R, T, dtype=torch.float64).scatter_add_(
        1, w["token_index"].reshape(R, -1).cpu(), torch.ones(R, E * C, dtype=torch.float64))  # (R, T)
    acc.add("expert_selected_gate", w["combine"].double().cpu().sum((0, 2)), R * C)
    acc.add("expert_mean_gate", w["gates"].double().sum((0, 1)), B * N)
    acc.add("tokens_unprocessed_fraction", (per_token == 0).double().sum(), R * T)
    acc.add("experts_per_token_mean", per_token.sum(), R * T)
    acc.add("experts_per_token_max", per_token.amax(1).sum(), R)
    acc.add("tokens", torch.tensor(float(B * N)), 1.0)
    acc.shape = (N, E, C)


def _layer_kind(layer: nn.Module) -> str:
    if isinstance(layer, SoftMoE):
        return "soft"
    if isinstance(layer, TokensChoiceMoE):
        return "tokens_choice"
    if isinstance(layer, ExpertsChoiceMoE):
        return "experts_choice"
    return "other"


@torch.no_grad()
def routing_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 64,
                       prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[dict]:
    """Run `model` (eval mode) over `images` (M, C, H, W) in batches and return one dict per
    MoE layer (module order) with "name", "kind" and its statistics (see module docstring).
    prepare: maps a batch of `images` (e.g. uint8) to model input; None = already model-ready.
    Raises ValueError when the model has no MoE layer."""
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("the model has no MoE layer (SoftMoE, TokensChoiceMoE or ExpertsChoiceMoE) to inspect; "
                         "is this a dense ViT checkpoint?")
    if images.shape[0] == 0:
        raise ValueError("no images to inspect")
    accs = {name: _Acc() for name, _ in layers}
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with record_routing(model, metrics=False, weights=True):
            for start in range(0, images.shape[0], batch_size):
                batch = images[start:start + batch_size]
                model.forward_features((prepare(batch) if prepare is not None else batch).to(dev))
                for name, layer in layers:
                    kind = _layer_kind(layer)
                    if kind == "soft":
                        _soft_batch(accs[name], layer)
                    elif kind == "tokens_choice":
                        _tc_batch(accs[name], layer)
                    elif kind == "experts_choice":
                        _ec_batch(accs[name], layer)
                    layer.routing_weights = {}  # free the (B, N, E, P) tensors
    finally:
        model.train(was_training)
    return [_summarise(name, layer, accs[name]) for name, layer in layers]


def _summarise(name: str, layer: nn.Module, acc: _Acc) -> dict:
    kind = _layer_kind(layer)
    out: dict = {"name": name, "kind": kind, "type": type(layer).__name__}
    if kind == "other":
        out["message"] = f"{type(layer).__name__}: no routing statistics available for this layer type"
        return out
    tokens = int(acc.sums["tokens"])
    if kind == "soft":
        N, E, P = acc.shape
        S = E * P
        ent = acc.mean("slot_dispatch_entropy")
        dmax, dmin = acc.mean("slot_dispatch_max"), acc.mean("slot_dispatch_min")
        mass = acc.mean("expert_combine_mass")
        top = acc.sums["expert_top_tokens"]
        cent = float(acc.mean("combine_entropy"))
        out.update(num_experts=E, slots_per_expert=P, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {
            "combine_weights_min_mean": float(acc.mean("combine_weights_min_mean")),
            "combine_weights_max_mean": float(acc.mean("combine_weights_max_mean")),
            "dispatch_weights_min_mean": float(acc.mean("dispatch_weights_min_mean")),
            "dispatch_weights_max_mean": float(acc.mean("dispatch_weights_max_mean")),
            "combine_entropy_mean": cent,
            "combine_entropy_normalized_mean": cent / math.log(S) if S > 1 else 0.0,
            "dispatch_entropy_mean": float(ent.mean()),
            "dispatch_entropy_normalized_mean": float(ent.mean()) / math.log(N) if N > 1 else 0.0,
        }
        out["slots"] = [{"slot": s, "expert": s // P, "slot_in_expert": s % P,
                         "dispatch_entropy": float(ent[s]),
                         "dispatch_entropy_normalized": float(ent[s]) / math.log(N) if N > 1 else 0.0,
                         "dispatch_max": float(dmax[s]), "dispatch_min": float(dmin[s])} for s in range(S)]
        out["experts"] = [{"expert": e, "combine_mass": float(mass[e]), "top_combine_tokens": int(top[e]),
                           "top_combine_fraction": float(top[e]) / max(tokens, 1)} for e in range(E)]
    elif kind == "tokens_choice":
        N, E, K = acc.shape
        load, choices, gate = acc.mean("expert_load"), acc.mean("expert_choices"), acc.mean("expert_mean_gate")
        out.update(num_experts=E, k=K, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {"dropped_choices_fraction": float(acc.mean("dropped_choices_fraction")),
                          "tokens_unprocessed_fraction": float(acc.mean("tokens_unprocessed_fraction"))}
        out["experts"] = [{"expert": e, "load": float(load[e]), "choices": float(choices[e]),
                           "mean_gate": float(gate[e])} for e in range(E)]
    else:
        N, E, C = acc.shape
        sel, gate = acc.mean("expert_selected_gate"), acc.mean("expert_mean_gate")
        out.update(num_experts=E, capacity=C, num_tokens=N, tokens_inspected=tokens)
        out["metrics"] = {"tokens_unprocessed_fraction": float(acc.mean("tokens_unprocessed_fraction")),
                          "experts_per_token_mean": float(acc.mean("experts_per_token_mean")),
                          "experts_per_token_max_mean": float(acc.mean("experts_per_token_max"))}
        out["experts"] = [{"expert": e, "selected_gate_mean": float(sel[e]), "mean_gate": float(gate[e])}
                          for e in range(E)]
    return out


def choose_slots(layer_stats: dict, slots: str | Sequence[int], auto_count: int = 4) -> list[int]:
    """Slots to draw for one Soft MoE layer: an explicit list (checked against the layer's
    E*P slots) or 'auto' / 'auto:K' = the K slots with the lowest mean dispatch entropy
    (the most peaked dispatch), most peaked first."""
    S = len(layer_stats["slots"])
    if isinstance(slots, str):
        text = slots.strip().lower()
        if text.startswith("auto"):
            k = auto_count
            if text != "auto":
                try:
                    k = int(text.split(":", 1)[1])
                except (IndexError, ValueError):
                    raise ValueError(f"slots must be 'auto', 'auto:K' or a list like '0,1,2,3', "
                                     f"got {slots!r}") from None
            if k < 1:
                raise ValueError(f"slots 'auto:K' needs K >= 1, got {slots!r}")
            ent = [s["dispatch_entropy"] for s in layer_stats["slots"]]
            return sorted(range(S), key=lambda s: (ent[s], s))[:min(k, S)]
        try:
            chosen = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise ValueError(f"slots must be 'auto', 'auto:K' or a list like '0,1,2,3', got {slots!r}") from None
    else:
        chosen = [int(s) for s in slots]
    if not chosen:
        raise ValueError("slots must name at least one slot")
    bad = [s for s in chosen if not 0 <= s < S]
    if bad:
        raise ValueError(f"slots {bad} out of range for layer {layer_stats['name']!r}, which has "
                         f"{S} slots (num_experts*slots_per_expert), valid 0..{S - 1}")
    return chosen


def patch_grid(model: nn.Module, num_tokens: int) -> tuple[int, int, int]:
    """(rows, cols, offset) of the patch grid for `num_tokens` tokens; tokens[offset:] are the
    patches in row-major order (offset 1 = a leading class token). From model.config's
    img_size / patch_size when they match, else the square root."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "img_size") and hasattr(cfg, "patch_size"):
        img = cfg.img_size if isinstance(cfg.img_size, (tuple, list)) else (cfg.img_size, cfg.img_size)
        pat = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (cfg.patch_size, cfg.patch_size)
        rows, cols = int(img[0]) // int(pat[0]), int(img[1]) // int(pat[1])
        if num_tokens - rows * cols in (0, 1):
            return rows, cols, num_tokens - rows * cols
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"cannot lay {num_tokens} tokens out as a patch grid (not a square and the model "
                         f"config gives no matching img_size/patch_size)")
    return side, side, 0


@torch.no_grad()
def dispatch_maps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{layer name: dispatch weights (B, N, S) float32 CPU} of every Soft MoE layer for the
    model-ready `images` (B, C, H, W), one forward in eval mode."""
    layers = [(n, m) for n, m in moe_layers(model) if isinstance(m, SoftMoE)]
    if not layers:
        raise ValueError("the model has no Soft MoE layer: dispatch heatmaps need a SoftMoE model")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with record_routing(model, metrics=False, weights=True):
            model.forward_features(images.to(dev))
            out = {}
            for name, m in layers:
                d = m.routing_weights["dispatch"]  # (B, N, E, P)
                out[name] = d.reshape(d.shape[0], d.shape[1], -1).float().cpu()
                m.routing_weights = {}
    finally:
        model.train(was_training)
    return out


def _display(img: torch.Tensor):
    """Model input (C, H, W) in [-1, 1] -> array for imshow (H, W[, 3]) in [0, 1]."""
    x = ((img.float().cpu() + 1.0) / 2.0).clamp(0, 1)
    if x.shape[0] == 1:
        return x[0].numpy(), "gray"
    return x[:3].permute(1, 2, 0).numpy(), None


def plot_dispatch_grid(images: torch.Tensor, dispatch: torch.Tensor, slots: Sequence[int], grid: tuple[int, int],
                       path, title: str = "", slot_labels: Sequence[str] | None = None,
                       row_labels: Sequence[str] | None = None) -> None:
    """Write a PNG: one row per image; column 0 the image, then for each slot in `slots` the
    slot's dispatch weights over the patch grid, overlaid on the image (each panel scaled
    from 0 to its own maximum, which is printed as a multiple of the uniform weight 1/N).

    images (B, C, H, W) model input in [-1, 1]; dispatch (B, N, S); grid (rows, cols) with
    rows*cols = N, or N - 1 when token 0 is a class token (left out of the picture). Written
    atomically (tmp file + os.replace)."""
    # A bare Figure renders with Agg without touching pyplot's global backend or figure list.
    from matplotlib.figure import Figure

    B, N, _ = dispatch.shape
    rows, cols = grid
    offset = N - rows * cols  # a leading class token is not drawn
    H, W = images.shape[-2:]
    ncol = 1 + len(slots)
    fig = Figure(figsize=(1.6 * ncol + 0.4, 1.6 * B + 0.6))
    axes = fig.subplots(B, ncol, squeeze=False)
    for b in range(B):
        img, cmap = _display(images[b])
        axes[b, 0].imshow(img, cmap=cmap, interpolation="nearest")
        axes[b, 0].set_ylabel(row_labels[b] if row_labels is not None else f"image {b}", fontsize=8)
        for j, s in enumerate(slots):
            ax = axes[b, j + 1]
            heat = dispatch[b, offset:, s].reshape(rows, cols).numpy()
            ax.imshow(img, cmap=cmap, interpolation="nearest", alpha=0.45)
            ax.imshow(heat, cmap="inferno", alpha=0.75, vmin=0.0, vmax=float(heat.max()) or 1.0,
                      extent=(-0.5, W - 0.5, H - 0.5, -0.5), interpolation="nearest")
            ax.text(0.02, 0.02, f"max {heat.max() * N:.1f}/N", transform=ax.transAxes, fontsize=6, color="white",
                    va="bottom", bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "linewidth": 0})
            if b == 0:
                label = slot_labels[j] if slot_labels is not None else f"slot {s}"
                ax.set_title(label, fontsize=8)
        if b == 0:
            axes[b, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle((title + "\n" if title else "") + "each panel coloured from 0 to its own max (printed as a "
                 "multiple of the uniform weight 1/N)", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def select_layers(stats: list[dict], layers: str | None) -> list[dict]:
    """The Soft MoE layers to draw: all (None / 'all'), or a comma list of indices among the
    Soft MoE layers (0 = the first) or of module names."""
    soft = [s for s in stats if s["kind"] == "soft"]
    if layers is None or layers.strip().lower() == "all":
        return soft
    chosen = []
    names = [s["name"] for s in soft]
    for part in (p.strip() for p in layers.split(",") if p.strip()):
        if part.isdigit() and int(part) < len(soft):
            chosen.append(soft[int(part)])
        elif part in names:
            chosen.append(soft[names.index(part)])
        else:
            raise ValueError(f"layers: {part!r} is neither an index in 0..{len(soft) - 1} nor the name of a Soft MoE "
                             f"layer; Soft MoE layers: {names}")
    return chosen


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
    from pathlib import Path

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
    experts.csv (one row per slot / expert of every layer). Each written atomically."""
    import csv
    import io
    import json
    from pathlib import Path

    out_dir = Path(out_dir)

    def atomic(name: str, text: str) -> None:
        atomic_write_text(out_dir / name, text)

    def table(rows: list[dict]) -> str:
        buf = io.StringIO()
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
        return buf.getvalue()

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
        atomic(name, table(rows))
    atomic("routing.json", json.dumps(report, indent=2) + "\n")
