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

import hashlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..layers.experts import Experts
from .expert_parallel import is_sharded, local, local_region


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


def _full_like(p: torch.Tensor, shape=None) -> nn.Parameter:
    """An uninitialised plain parameter of `p`'s global shape (or `shape`), dtype and device."""
    t = local(p)
    return nn.Parameter(torch.empty(p.shape if shape is None else shape, dtype=t.dtype, device=t.device),
                        requires_grad=False)


def _experts_of(module: nn.Module) -> tuple[nn.Module, int] | None:
    """(the experts module, global expert count) for an experts module (whole, sharded over
    "ep" and/or "dp", as DTensors or plain tensors), else None."""
    if isinstance(module, Experts) or is_sharded(module):
        return module, module.num_experts
    return None


def _draw_expert(experts: nn.Module, params: dict, key: int, device) -> dict[str, torch.Tensor]:
    """One expert's parameters {name: (1, ...)} drawn by `experts.reset_parameters` under `key`:
    for the call, the module's parameter slots hold fresh one-expert tensors and its
    num_experts is 1 (both restored after; its own tensors are not touched)."""
    drawn = {k: _full_like(p, (1, *p.shape[1:])) for k, p in params.items()}
    saved = experts.num_experts
    experts._parameters.update(drawn)
    experts.__dict__["num_experts"] = 1
    try:
        _run_seeded(key, device, experts.reset_parameters)
    finally:
        experts._parameters.update(params)
        experts.__dict__["num_experts"] = saved
    return {k: v.data for k, v in drawn.items()}


@torch.no_grad()
def _init_experts(name: str, experts: nn.Module, total: int, seed: int) -> None:
    params = dict(experts._parameters)
    if not params:
        return
    if any(p.dim() == 0 or p.shape[0] != total for p in params.values()):
        raise ValueError(f"{name}: every expert parameter must have num_experts={total} as dim 0")
    regions = {k: local_region(p) for k, p in params.items()}
    device = local(next(iter(params.values()))).device
    identical = getattr(experts, "expert_init", "distinct") == "identical"
    one = _draw_expert(experts, params, param_key(seed, name), device) if identical else None
    rows = sorted({e for r in regions.values() for e in range(r[0].start, r[0].stop)})
    for e in rows:  # initialisation only: one small draw per local expert
        drawn = one if identical else _draw_expert(experts, params, param_key(seed, name, e), device)
        for k, p in params.items():
            r = regions[k]
            if r[0].start <= e < r[0].stop:
                local(p)[e - r[0].start] = drawn[k][(0, *r[1:])]


def _init_module(name: str, module: nn.Module, seed: int, reset) -> None:
    """`reset()` under key (seed, name). A DTensor parameter of `module` or a descendant (an
    FSDP shard; experts excluded: they are drawn per expert) is drawn whole into a temporary
    plain tensor in its slot, filled with NaN first: what `reset` wrote (not NaN) is copied
    into this rank's block, what it left alone (a descendant's parameter that this reset does
    not re-draw) is kept. Only one module's tensors are ever whole, and modules with a
    `reset_parameters` are small (a Linear, an Attention, an Mlp, a router)."""
    swapped = []
    for pname, p in module.named_parameters():
        owner_name, _, leaf = pname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if isinstance(p, DTensor) and _experts_of(owner) is None:
            swapped.append((owner, leaf, p, _full_like(p).fill_(float("nan"))))
    for owner, leaf, _, full in swapped:
        owner._parameters[leaf] = full
    try:
        device = local(next(module.parameters(), torch.empty(0))).device
        _run_seeded(param_key(seed, name), device, reset)
    finally:
        for owner, leaf, p, _ in swapped:
            owner._parameters[leaf] = p
    with torch.no_grad():
        for _, _, p, full in swapped:
            drawn = full.data[local_region(p)]
            local(p).copy_(torch.where(drawn.isnan(), local(p), drawn))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> nn.Module:
    """Initialise every parameter of `model` (parallelised or not, materialised) by its module's
    `reset_parameters`, keyed by (seed, module name[, global expert index]) as the module
    docstring says. ValueError for a parameter that no `reset_parameters` of its module or an
    ancestor initialises, or a meta tensor. Returns `model`."""
    meta = [n for n, p in model.named_parameters() if local(p).is_meta]
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
            _init_module(name, module, seed, reset)
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
