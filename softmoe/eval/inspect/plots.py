"""Dispatch heatmaps: which Soft MoE layers and slots to draw, their dispatch weights over
the patch grid, and the PNG grid of them (matplotlib, imported when drawing)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..._io import atomic_write
from ...layers import SoftMoE, moe_layers, record_routing


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
