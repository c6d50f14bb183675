"""Run logging: JSONL metrics (the record every other output is built from), optional
TensorBoard, the end-of-run summary table and PNG plots."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from softmoe._io import atomic_write, atomic_write_text

METRICS = "metrics.jsonl"


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = Path(workdir) / METRICS
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a crash mid-write
                continue
    return out


def truncate_metrics(workdir: str | os.PathLike, step: int) -> None:
    """Keep only records with step <= `step` (a resumed run rewrites what came after its
    checkpoint). Rewritten atomically."""
    path = Path(workdir) / METRICS
    if not path.is_file():
        return
    kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl (flushed each write, so a
    crash loses at most the line being written) and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True, purge_step: int | None = None,
                 notice=print) -> None:
        self.path = Path(workdir) / METRICS
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard (or one of its deps) is not installed
                notice("tensorboard is not installed: skipping TensorBoard logs (metrics.jsonl has everything)")
            else:
                self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=True) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def write_plots(workdir: str | os.PathLike, records: list[dict] | None = None, notice=print) -> list[Path]:
    """plots/loss.png, accuracy.png, lr.png (and router.png for MoE runs) from the metrics records; [] if
    matplotlib is missing (with a notice)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notice("matplotlib is not installed: skipping plots")
        return []
    records = read_metrics(workdir) if records is None else records
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    out_dir = Path(workdir) / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
        plt.close(fig)
        written.append(path)

    series = [("loss.png", "loss", [("train", train, "loss"), ("val", evals, "val_loss"),
                                     ("test", evals, "test_loss")]),
              ("accuracy.png", "accuracy", [("val", evals, "val_accuracy"), ("test", evals, "test_accuracy"),
                                            ("train (batch)", train, "accuracy")]),
              ("lr.png", "learning rate", [("lr", train, "lr")])]
    for name, ylabel, lines in series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows, key in lines:
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o" if len(pts) < 20 else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        save(fig, name)
    router = sorted({k for r in evals for k in r if k.startswith("router/")})
    if router:  # the routing diagnostics at every evaluation, one panel per metric, a line per layer
        metrics = sorted({k.rsplit("/", 1)[1] for k in router})
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for key in (k for k in router if k.endswith("/" + metric)):
                pts = [(r["step"], r[key]) for r in evals if key in r]
                ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, label=key.split("/")[1])
            ax.set(xlabel="step", title=metric)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "router.png")
    return written


def is_tty(stream=None) -> bool:
    stream = stream or sys.stderr
    return hasattr(stream, "isatty") and stream.isatty()
