"""Evaluation: top-1/top-5 accuracy, the few-shot linear probe (docs/design.md §5) and routing analysis.

    from softmoe.eval import evaluate_model, fewshot_ridge, routing_statistics
"""
from .classify import predict, topk_accuracy
from .fewshot import DEFAULT_SHOTS, RidgeProbe, default_l2_regs, fewshot_evaluate, fewshot_ridge, select_fewshot
from .inspect import dispatch_maps, inspect_model, routing_statistics
from .run import evaluate_model

__all__ = ["predict", "topk_accuracy", "DEFAULT_SHOTS", "RidgeProbe", "default_l2_regs", "fewshot_evaluate",
           "fewshot_ridge", "select_fewshot", "dispatch_maps", "inspect_model", "routing_statistics", "evaluate_model"]
