"""timm interoperability (optional: needs `timm`, which needs `torchvision`).

- `import_timm()`: import timm; works around torchvision's import crash on CPU-only torch
  (see the function).
- `timm_to_moe(model, moe_type, num_experts, placement, init)`: a timm VisionTransformer whose
  MLPs in the chosen blocks are replaced by our Soft MoE / Tokens Choice / Experts Choice
  layers (hidden width = the timm MLP's; the experts apply the MLP's own activation and
  dropout); everything else of the timm model is kept. `init="upcycle"` copies the MLP into
  every expert (sparse upcycling, see softmoe.models.upcycle).
- `register_timm_models()`: registers every softmoe model name in timm's registry, so that
  `timm.create_model("soft_moe_s16", num_classes=10)` builds our model. Nothing is
  registered at import time of softmoe; call it once (it is idempotent).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import functools
import sys
import warnings

import torch
from torch import nn

from softmoe._compat import define_missing_torchvision_ops
from softmoe.layers import Experts

from .config import MOE_LAYERS, ViTConfig, moe_block_indices, resolve_moe_type
from .registry import create_model, get_config, list_models
from .vit import timm_cfg

# timm kwargs our models accept only as no-ops (timm's train script always passes them).
_NOOP_TIMM_KWARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate")
_GLOBAL_POOL = {"avg": "gap", "gap": "gap", "token": "token", "map": "map"}


def import_timm():
    """`import timm`, with the CPU-only-torch workaround above; ImportError if timm (or
    torchvision) is not installed."""
    if "timm" not in sys.modules:
        define_missing_torchvision_ops()
    import timm

    return timm


# -- experts that apply the replaced MLP's activation ----------------------------------------
class MlpExperts(Experts):
    """`Experts` whose hidden activation and dropouts are modules taken from the MLP they
    replace (timm uses exact GELU, our ViT the tanh approximation):
    `y[e] = drop2(W2_e drop1(act(W1_e x[e] + b1_e)) + b2_e)`. forward (E, M, D) -> (E, M, D).
    The same module as `Experts(..., act_layer=act, drop1=drop1, drop2=drop2)` (a GELU keeps
    the fused path), kept under this name for the checkpoints' and users' code."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, act: nn.Module | None = None,
                 drop1: nn.Module | None = None, drop2: nn.Module | None = None, expert_init: str = "identical",
                 **kwargs) -> None:
        super().__init__(num_experts, dim, hidden_dim, expert_init=expert_init, act_layer=act, drop1=drop1,
                         drop2=drop2, **kwargs)


def _check_timm_mlp(mlp: nn.Module, where: str) -> tuple[int, int]:
    """(width D, hidden width H) of a timm `Mlp` (fc1 -> act -> drop1 -> norm -> fc2 -> drop2),
    or a ValueError for MLP kinds our experts cannot express (GLU/SwiGLU, a norm inside, conv)."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and hasattr(mlp, "act")):
        raise ValueError(f"{where} is a {type(mlp).__name__}; only timm's plain Mlp (fc1 -> act -> fc2, nn.Linear) "
                         f"can become experts (GluMlp / SwiGLU / conv MLPs are not supported)")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"{where} has a norm layer inside its MLP ({type(mlp.norm).__name__}); not supported")
    if fc2.out_features != fc1.in_features or fc2.in_features != fc1.out_features:
        raise ValueError(f"{where}: MLP shapes fc1 {fc1.in_features}->{fc1.out_features}, fc2 "
                         f"{fc2.in_features}->{fc2.out_features} do not map the width back to itself")
    return fc1.in_features, fc1.out_features


def expert_tensors_from_mlp(fc1: nn.Linear, fc2: nn.Linear, num_experts: int) -> dict[str, torch.Tensor]:
    """Sparse upcycling: every expert = the dense MLP. w1 (E, D, H) = fc1.weight.T, b1 (E, H)
    = fc1.bias, w2 (E, H, D) = fc2.weight.T, b2 (E, D) = fc2.bias (zeros if the Linear has
    no bias)."""
    def bias(fc):
        return fc.bias.detach() if fc.bias is not None else fc.weight.new_zeros(fc.out_features)

    E = num_experts
    return {"w1": fc1.weight.detach().t().unsqueeze(0).expand(E, -1, -1).contiguous(),
            "b1": bias(fc1).unsqueeze(0).expand(E, -1).contiguous(),
            "w2": fc2.weight.detach().t().unsqueeze(0).expand(E, -1, -1).contiguous(),
            "b2": bias(fc2).unsqueeze(0).expand(E, -1).contiguous()}


def _check_init(init: str) -> None:
    if init not in ("fresh", "upcycle"):
        raise ValueError(f"init must be 'fresh' or 'upcycle', got {init!r}")


def timm_to_moe(model: nn.Module, moe_type: str = "soft", num_experts: int = 8, placement="last_half",
                init: str = "fresh", inplace: bool = False, **moe_kwargs) -> nn.Module:
    """Replace the MLPs of the chosen blocks of a timm VisionTransformer by MoE layers.

    moe_type: "soft" / "tc" / "ec" or a class name (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE).
    placement: as `MoEConfig.placement`: "last_half", "last:N", "every:K", "all" or a
      list of block indices.
    init: "fresh" (router and experts newly initialised) or "upcycle" (each expert a copy of
      the MLP it replaces; router/gates fresh).
    moe_kwargs: further arguments of the MoE layer (slots_per_expert, k, capacity_factor...).
    Returns the converted model (a deep copy unless `inplace`). The MoE layers live at
    `blocks[i].mlp`; `softmoe.collect_aux_loss(model)` etc. work on the result. It keeps timm's
    model contract: the MoE layers are registered as timm fx leaves, and `model.no_weight_decay()`
    adds their router phi and expert biases (for `timm.optim.create_optimizer_v2`).
    """
    _check_init(init)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not all(hasattr(b, "mlp") for b in blocks):
        raise ValueError(f"model must be a timm VisionTransformer-like model with .blocks[i].mlp, "
                         f"got {type(model).__name__}")
    cls = MOE_LAYERS[resolve_moe_type(moe_type)]
    for bad in ("dim", "num_experts", "hidden_dim"):
        if bad in moe_kwargs:
            raise ValueError(f"moe_kwargs may not set {bad!r}: it comes from the timm model / num_experts")
    indices = moe_block_indices(placement, len(blocks))
    if not inplace:
        model = copy.deepcopy(model)
    _register_fx_leaves()
    for i in indices:
        mlp = model.blocks[i].mlp
        dim, hidden = _check_timm_mlp(mlp, f"blocks[{i}].mlp")
        ref = mlp.fc1.weight
        with torch.device(ref.device):
            layer = cls(dim=dim, num_experts=num_experts, hidden_dim=hidden, **moe_kwargs)
            experts = MlpExperts(num_experts, dim, hidden, act=copy.deepcopy(mlp.act),
                                 drop1=copy.deepcopy(getattr(mlp, "drop1", None)),
                                 drop2=copy.deepcopy(getattr(mlp, "drop2", None)),
                                 expert_init=layer.experts.expert_init)
        layer.experts = experts
        layer.to(dtype=ref.dtype)
        if init == "upcycle":
            with torch.no_grad():
                for name, value in expert_tensors_from_mlp(mlp.fc1, mlp.fc2, num_experts).items():
                    getattr(experts, name).copy_(value)
        layer.train(mlp.training)
        model.blocks[i].mlp = layer
    if not isinstance(model.__dict__.get("no_weight_decay"), _ConvertedNoWeightDecay):
        model.no_weight_decay = _ConvertedNoWeightDecay(model)
    return model


class _ConvertedNoWeightDecay:
    """`model.no_weight_decay()` of a model converted by `timm_to_moe` (timm's optimizers call it):
    the timm model's own names plus those of its MoE layers that take no weight decay (docs/design.md
    §4, as our VisionTransformer: the Soft MoE router's phi, a 3-D tensor timm would otherwise decay,
    and the experts' biases). An instance attribute, so deepcopy / pickling carry it with the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self) -> set[str]:
        own = type(self.model).__dict__.get("no_weight_decay")
        names = set(own(self.model)) if callable(own) else set()
        for path, layer in self.model.named_modules():
            if isinstance(layer, tuple(MOE_LAYERS.values())):
                names |= {f"{path}.{n}" for n, _ in layer.named_parameters()
                          if n.endswith("router.phi") or n.rsplit(".", 1)[-1] in ("b1", "b2")}
        return names


# -- timm registry --------------------------------------------------------------------------
# What timm.create_model may pass besides ViTConfig fields (see `_build`).
_LEGACY_KWARGS = ("moe_type", "num_experts", "moe_placement", "moe_kwargs")
# timm reads a model module's `default_cfgs` when registering its entrypoints (`register_timm_models`).
default_cfgs: dict[str, dict] = {}


def _build(name: str, device=None, dtype=None, **kwargs) -> nn.Module:
    """`create_model(name, **kwargs)` for timm's `build_model_with_cfg`: timm's names mapped
    (global_pool, img_size as (H, W), device, dtype, zero drop rates); an unknown argument is a
    TypeError, as for a timm model's constructor."""
    for key in _NOOP_TIMM_KWARGS:
        if kwargs.get(key, 0) not in (0, 0.0, None):
            raise ValueError(f"{name}: {key}={kwargs[key]!r} is not supported (our ViTs have no dropout); use 0")
        kwargs.pop(key, None)
    if "global_pool" in kwargs:
        pool = kwargs.pop("global_pool")
        if pool == "":  # timm: no pooling, forward returns the tokens
            kwargs["pool"], unpooled = "gap", True
        elif pool in _GLOBAL_POOL:
            kwargs["pool"], unpooled = _GLOBAL_POOL[pool], False
        else:
            raise ValueError(f"{name}: global_pool must be '' or one of {sorted(_GLOBAL_POOL)}, got {pool!r}")
    else:
        unpooled = False
    size = kwargs.get("img_size")
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"{name}: img_size must be an int or a square (H, H), got {size!r}")
        kwargs["img_size"] = int(size[0])
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(kwargs) - fields - set(_LEGACY_KWARGS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise TypeError(f"{name}: unexpected keyword argument(s) {unknown}; {hint}the model takes ViTConfig fields "
                        f"{sorted(fields)}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = create_model(name, **kwargs)
    if dtype is not None:
        model.to(dtype=dtype)
    if unpooled:
        model.reset_classifier(model.num_classes, "")
    return model


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are published; load a checkpoint directory with "
                             f"softmoe.models.from_pretrained(dir) or pass checkpoint_path=... to timm.create_model")
        from timm.models import build_model_with_cfg

        # features_only=True: timm's FeatureGetterNet over forward_intermediates, last 3 blocks (as timm's ViTs).
        return build_model_with_cfg(functools.partial(_build, name), name, pretrained=False,
                                    feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"softmoe model {name!r} (softmoe.models.create_model) for timm.create_model."
    return entrypoint


def _register_fx_leaves() -> None:
    """Mark our MoE layers as leaves for timm's torch.fx tracing (feature extraction, its FX
    tests): their routing is data dependent. Idempotent (timm keeps a set)."""
    from timm.models import register_notrace_module

    for cls in MOE_LAYERS.values():
        register_notrace_module(cls)


def register_timm_models(pattern: str = "*") -> list[str]:
    """Register the softmoe models matching `pattern` in timm's registry (with their
    pretrained_cfg) and return the names now available through `timm.create_model`. Also marks
    the MoE layers as leaves for timm's torch.fx tracing (their routing is data dependent).
    Idempotent. A name timm already uses for one of its own models is left alone (with a warning)."""
    timm = import_timm()
    from timm.models import _registry

    _register_fx_leaves()
    module = sys.modules[__name__]
    registered = []
    for name in list_models(pattern):
        owner = _registry._model_to_module.get(name)
        if owner is not None and owner != __name__.rsplit(".", 1)[-1]:
            warnings.warn(f"timm already has a model named {name!r} (module {owner}); not registering ours",
                          stacklevel=2)
            continue
        if owner is None:
            fn = _entrypoint(name)
            setattr(module, name, fn)  # timm adds the name to this module's __all__
            default_cfgs[name] = timm_cfg(get_config(name))
            timm.models.register_model(fn)
        registered.append(name)
    return registered


__all__ = ["import_timm", "timm_to_moe", "register_timm_models", "MlpExperts", "expert_tensors_from_mlp"]
