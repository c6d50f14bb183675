"""Layout-independent initialisation: build on the meta device, parallelise, materialise only
the local shards, then initialise them so that the weights are the same numbers at every
layout (one process, EP 1, 2, 4, DP x EP) without any rank holding the whole model.

    with torch.device("meta"):
        model = create_model("soft_moe_s16", num_classes=10)   # nothing allocated
    smd.parallelize(model, mesh)                               # local expert shards (still meta)
    smd.materialize(model, "cuda", seed=0)                     # to_empty + init_weights

`init_weights(model, seed)` re-runs every module's own `reset_parameters` (the initialiser the
module's constructor used: the distributions do not change), children before their parent,
each under a generator seeded by a key of (seed, module name): the numbers a module gets
depend on nothing else (not on the layout, the construction order or the global RNG, which
it leaves untouched). Experts are initialised one global expert at a time, keyed by
(seed, module name, global expert index), so rank r's shard holds exactly rows lo..hi-1 of
what one process draws:

  expert_init "distinct":  expert e's (w1, b1, w2, b2) drawn under key (seed, name, e);
  expert_init "identical": every expert a copy of one expert drawn under key (seed, name),
                           biases included (vmoe's `split_rngs=False`: all parameters shared).

The single-process trainer uses the same function, so its numbers differ from the plain
constructor's (`torch.manual_seed(seed); create_model(...)`) -- same distributions, other draws;
under "identical" the tiny N(0, 1e-6) expert biases are now equal across experts too.
The per-expert step is a Python loop over the local experts at initialisation only (a few
hundred small draws for the largest models), never in a forward pass.
"""
from __future__ import annotations

import copy
import hashlib

import torch
from torch import nn

from ..layers.experts import Experts
from .expert_parallel import ExpertParallel


def param_key(seed: int, *parts) -> int:
    """A 63-bit generator seed from `seed` and a parameter path (and expert index): stable across
    processes, Python versions and layouts (sha256, not Python's salted `hash`)."""
    digest = hashlib.sha256("/".join(str(p) for p in (int(seed), *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _seeded(key: int, device: torch.device):
    """Fork the RNG of `device` (and the CPU's) and seed it with `key`; restored on exit."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    ctx = torch.random.fork_rng(devices=devices)
    ctx.__enter__()
    torch.manual_seed(key)
    return ctx


def _run_seeded(key: int, device: torch.device, fn) -> None:
    ctx = _seeded(key, device)
    try:
        fn()
    finally:
        ctx.__exit__(None, None, None)


def _experts_of(module: nn.Module) -> tuple[nn.Module, int, int] | None:
    """(the module whose `reset_parameters` draws the experts, global offset of its first expert,
    global expert count) for an experts module (whole or an expert-parallel shard), else None."""
    if isinstance(module, ExpertParallel):
        return module.local, module.expert_offset, module.num_experts
    if isinstance(module, Experts):
        return module, 0, module.num_experts
    return None


def _one_expert_view(experts: nn.Module, i: int) -> nn.Module:
    """A shallow copy of `experts` whose parameters are views of row i of its own (writes land
    in `experts`' tensors), with num_experts 1, for that module's `reset_parameters`."""
    view = copy.copy(experts)
    view._parameters = {k: nn.Parameter(p.data[i:i + 1], requires_grad=False) for k, p in
                        experts._parameters.items()}
    view.num_experts = 1
    return view


@torch.no_grad()
def _init_experts(name: str, experts: nn.Module, offset: int, total: int, seed: int) -> None:
    params = list(experts._parameters.values())
    if not params:
        return
    local = params[0].shape[0]
    if any(p.dim() == 0 or p.shape[0] != local for p in params):
        raise ValueError(f"{name}: every expert parameter must have the local expert count {local} as dim 0")
    if offset + local > total:
        raise ValueError(f"{name}: experts {offset}..{offset + local - 1} exceed num_experts={total}")
    device = params[0].device
    if getattr(experts, "expert_init", "distinct") == "identical":
        _run_seeded(param_key(seed, name), device, _one_expert_view(experts, 0).reset_parameters)
        for p in params:
            p.data[1:] = p.data[:1]
        return
    for i in range(local):  # initialisation only: one small draw per local expert
        _run_seeded(param_key(seed, name, offset + i), device, _one_expert_view(experts, i).reset_parameters)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Initialise every parameter of `model` (parallelised or not, materialised) by its module's
    `reset_parameters`, keyed by (seed, module name[, global expert index]) as the module
    docstring says. ValueError for a parameter that no `reset_parameters` of its module or an
    ancestor initialises, or a meta tensor. Returns `model`."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"parameters {meta[:3]} are on the meta device: materialise first (smd.materialize, "
                         f"or model.to_empty(device=...))")
    covered: set[int] = set()
    for name, module in reversed(list(model.named_modules())):  # every module after its descendants
        experts = _experts_of(module)
        if experts is not None:
            _init_experts(name, *experts, seed)
            covered.update(id(p) for p in module.parameters())
            continue
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            device = next(module.parameters(), torch.empty(0)).device
            _run_seeded(param_key(seed, name), device, reset)
            covered.update(id(p) for p in module.parameters())
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"parameters {missing[:3]} belong to no module with reset_parameters: init_weights "
                         f"cannot initialise them (give their module a reset_parameters)")
    return model


def materialize(model: nn.Module, device: str | torch.device, seed: int) -> nn.Module:
    """Allocate `model`'s (local) parameters on `device` (`to_empty`: uninitialised memory, only
    this rank's shards) and initialise them with `init_weights(model, seed)`. Returns `model`."""
    model.to_empty(device=torch.device(device))
    return init_weights(model, seed)
