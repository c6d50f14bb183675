"""Routing analysis of a trained MoE model: what each Soft MoE slot looks at, how the
experts share the output, and the corresponding load statistics of sparse layers.

stats.py computes the statistics (see its docstring for every figure), plots.py chooses and
draws the dispatch heatmaps, report.py runs both and writes the report files.
"""
from .plots import choose_slots, dispatch_maps, patch_grid, plot_dispatch_grid, select_layers
from .report import inspect_model, write_report
from .stats import routing_statistics

__all__ = ["choose_slots", "dispatch_maps", "inspect_model", "patch_grid", "plot_dispatch_grid",
           "routing_statistics", "select_layers", "write_report"]
