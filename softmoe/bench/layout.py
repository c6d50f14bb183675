"""Memory per rank and bytes per step of each parallel layout: the cost model of docs/distributed.md (nothing runs).

`softmoe bench layout [--model soft_moe_h14] [--experts 256] [--world 64 512] [--global-batch 4096]`

The model is built on the meta device (no memory) and its parameters are split into experts
(every `softmoe.layers.Experts` module) and the rest ("dense": embeddings, attention, norms,
routers, head). For every world size W and every expert-parallel size ep that divides both W
and E (1, 8 and the largest such ep are listed; `--ep` chooses), two data-parallel engines:

  ddp    experts sharded over ep and replicated over their dp = W/ep replicas; the dense part
         replicated on every rank; gradients all-reduced (ring: 2 (n-1)/n x bytes per rank).
  fsdp   experts sharded over ep, then over their dp group; the dense part over all W ranks;
         parameters all-gathered in the forward and again in the backward (reshard after
         forward, FSDP2's default), gradients reduce-scattered: 3 (n-1)/n x bytes per rank.

Memory per rank is the training state only: float32 weights + gradients + AdamW's two moments,
16 bytes per parameter (`--state-bytes`), sharded as above; activations and FSDP's transient
unsharded block are left out (they depend on the batch and on prefetching, not on the layout's
sharding). Communication per rank and step: the experts' all-to-all (4 equal-split exchanges per
MoE layer, `4 (ep-1)/ep x S b D` numbers, b = global batch / W sequences per rank) plus the gradient
term of each part, with `--comm-bytes` per number (4: float32; 2: bf16 parameters and
activations). All figures are decimal GB (1e9 bytes).

Why it matters (docs/distributed.md, "Memory per rank and placement"): the all-to-all moves
activations, which scale with the batch, while data parallelism over experts moves weights, which
scale with the parameters. Per MoE layer and rank the ratio of FSDP's expert traffic to the
all-to-all's is about 1.5 H / (ep b P), so the expert-parallel group should be as large as E and
the interconnect allow, and FSDP over experts is for fitting memory, not for speed.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from softmoe._tables import write_table

GB = 1e9


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """What the cost model needs from a model: parameter counts by kind and the MoE shapes."""
    name: str
    experts: int          # E of every MoE layer
    expert_params: int    # all Experts modules' parameters
    dense_params: int     # everything else
    moe_layers: int       # L_moe
    slots: int            # S = E * P per sequence
    dim: int              # D
    hidden: int           # H of an expert


def count_model(name: str, experts: int | None = None) -> ModelCounts:
    """ModelCounts of registered Soft MoE model `name` (optionally with `experts` experts per layer),
    built on the meta device."""
    import torch

    from softmoe.layers import Experts, SoftMoE
    from softmoe.models import create_model

    overrides = {} if experts is None else {"moe": {"num_experts": experts}}
    with torch.device("meta"):
        model = create_model(name, **overrides)
    layers = [m for m in model.modules() if isinstance(m, SoftMoE)]
    if not layers:
        raise ValueError(f"--model must be a Soft MoE model (the all-to-all term is for Soft MoE slots), "
                         f"got {name!r}, which has no SoftMoE layer")
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    params = list(model.parameters())
    first = layers[0]
    return ModelCounts(
        name=name, experts=first.num_experts,
        expert_params=sum(p.numel() for p in params if id(p) in expert_ids),
        dense_params=sum(p.numel() for p in params if id(p) not in expert_ids),
        moe_layers=len(layers), slots=first.num_experts * first.slots_per_expert,
        dim=first.experts.dim, hidden=first.experts.hidden_dim)


def ring(n: int) -> float:
    """(n-1)/n: the share of a tensor a rank receives in a ring all-gather or reduce-scatter over n ranks."""
    return (n - 1) / n


def layout_cost(c: ModelCounts, world: int, ep: int, engine: str, global_batch: int,
                state_bytes: float = 16, comm_bytes: float = 4) -> dict:
    """One row of the table: memory per rank (GB) and communication per rank per step (GB)."""
    if engine not in ("ddp", "fsdp"):
        raise ValueError(f"engine must be 'ddp' or 'fsdp', got {engine!r}")
    if world % ep or c.experts % ep:
        raise ValueError(f"ep={ep} must divide the world size {world} and num_experts={c.experts}")
    if global_batch % world:
        raise ValueError(f"--global-batch={global_batch} must be divisible by the world size {world}")
    dp = world // ep
    b = global_batch // world
    experts_local = c.expert_params / ep                     # after expert parallelism
    if engine == "ddp":
        mem = (experts_local + c.dense_params) * state_bytes
        grad_experts = 2 * ring(dp) * experts_local * comm_bytes
        grad_dense = 2 * ring(world) * c.dense_params * comm_bytes
    else:
        mem = (experts_local / dp + c.dense_params / world) * state_bytes
        grad_experts = 3 * ring(dp) * experts_local * comm_bytes
        grad_dense = 3 * ring(world) * c.dense_params * comm_bytes
    a2a = 4 * ring(ep) * c.slots * b * c.dim * comm_bytes * c.moe_layers
    return {"model": c.name, "E": c.experts, "W": world, "ep": ep, "dp": dp, "engine": engine, "b": b,
            "memory GB/rank": mem / GB, "all-to-all GB/step": a2a / GB,
            "expert grad+param GB/step": grad_experts / GB, "dense grad+param GB/step": grad_dense / GB,
            "total comm GB/step": (a2a + grad_experts + grad_dense) / GB}


def default_eps(world: int, experts: int) -> list[int]:
    """1, 8 (one machine of 8 GPUs) and the largest ep dividing both W and E, where they divide."""
    largest = max(d for d in range(1, min(world, experts) + 1) if world % d == 0 and experts % d == 0)
    return sorted({ep for ep in (1, 8, largest) if world % ep == 0 and experts % ep == 0})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="soft_moe_h14", help="a registered Soft MoE model (default soft_moe_h14)")
    parser.add_argument("--experts", type=int, default=256, help="experts per MoE layer (default 256: the 54B H/14)")
    parser.add_argument("--world", type=int, nargs="+", default=[64, 512], help="world sizes (default 64 512)")
    parser.add_argument("--ep", type=int, nargs="+", default=None,
                        help="expert-parallel sizes (default: 1, 8 and the largest dividing W and E)")
    parser.add_argument("--global-batch", type=int, default=4096, help="sequences per step (default 4096, the paper's)")
    parser.add_argument("--state-bytes", type=float, default=16,
                        help="training-state bytes per parameter (default 16: fp32 weight, grad, 2 AdamW moments)")
    parser.add_argument("--comm-bytes", type=float, default=4, help="bytes per communicated number (default 4: fp32)")
    parser.add_argument("--out", default="bench_results", help="output folder for layout.md / layout.csv")


def _check_args(args) -> None:
    for name in ("experts", "global_batch"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("state_bytes", "comm_bytes"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for w in args.world:
        if w < 1 or args.global_batch % w:
            raise ValueError(f"--world must be >= 1 and divide --global-batch={args.global_batch}, got {w}")
    for ep in args.ep or []:
        if ep < 1 or args.experts % ep:
            raise ValueError(f"--ep must be >= 1 and divide --experts={args.experts}, got {ep}")


def run(args) -> int:
    _check_args(args)
    counts = count_model(args.model, args.experts)
    rows = []
    for world in args.world:
        eps = [ep for ep in (args.ep or default_eps(world, counts.experts)) if world % ep == 0]
        for ep in eps:
            for engine in ("ddp", "fsdp"):
                rows.append(layout_cost(counts, world, ep, engine, args.global_batch, args.state_bytes,
                                        args.comm_bytes))
    header = list(rows[0])
    table = [[f"{r[k]:.3g}" if isinstance(r[k], float) else r[k] for k in header] for r in rows]
    notes = [f"{counts.name} with {counts.experts} experts: {counts.expert_params / 1e9:.3f}B expert parameters, "
             f"{counts.dense_params / 1e6:.1f}M dense; {counts.moe_layers} MoE layers, S={counts.slots}, "
             f"D={counts.dim}, H={counts.hidden}",
             f"global batch {args.global_batch}; {args.state_bytes:g} state bytes per parameter, "
             f"{args.comm_bytes:g} bytes per communicated number; decimal GB; activations not counted"]
    title = "Parallel layouts: memory per rank and communication per rank per step"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = write_table(out, "layout", header, table, title, notes)
    print(Path(md_path).read_text(encoding="utf-8"))
    print(f"wrote {md_path} and {csv_path}")
    return 0
