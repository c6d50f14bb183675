"""Expert parallelism: one MoE layer, all-to-all vs all-gather, at 1, 2, 4 processes; `--mode fsdp`: FSDP2 train steps.

`--mode layer` (the default) launches `--procs` local processes (gloo on CPU, NCCL on GPUs, one
thread each on CPU so they do not oversubscribe) for each process count, builds one Soft MoE
layer at the given shape, and times a forward + backward step with

  a2a:    `softmoe.distributed.shard_experts` (two equal-split all-to-alls each way);
  gather: the popular port's design (`AllGatherExperts`): all-gather every rank's slots, run
          the local experts on all of them, all-gather the outputs (its backward, as in the
          port, keeps only this rank's share and is therefore wrong; timed as it is).

Communication time is the same step's time spent in the collectives (measured by timing each
collective call). Bytes moved per rank and step are computed analytically (docs/distributed.md)
and checked against the tensors the collectives actually received.

`--mode fsdp` (softmoe/bench/_fsdp_steps.py) builds a Soft MoE ViT (`--model`, `--experts`) on
the meta device, parallelises it as `softmoe train` does (experts over "ep", FSDP2) at every
`--layouts` dp x ep (default: every one with dp * ep in `--procs`), and times whole training
steps of a `--global-batch` (forward, backward, the EP-aware clip, AdamW), one launch per layout:
step time, host time blocked in collectives, the step's collectives replayed alone, bytes per
rank by kind (checked equal to the byte model), parameters and peak memory per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from softmoe.distributed.launch import run_processes


class _PortAllGather(torch.autograd.Function):
    """All-gather along `dim` over `group`; backward returns only this rank's chunk of the
    incoming gradient, with no sum over ranks: the gradient terms of the other ranks' losses
    are dropped (the port's bug, kept here to show that the tests catch it)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.rank, ctx.size = dim, dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.size, ctx.dim)[ctx.rank].contiguous(), None, None


def _slice_experts(experts: nn.Module, lo: int, hi: int) -> nn.Module:
    """A module of `experts`' type holding experts lo .. hi-1 (copies of those rows of every
    parameter; settings and children shared): the port design's local experts."""
    with torch.device("meta"):  # construct cheaply; the parameters are replaced below
        local = type(experts)(num_experts=hi - lo, dim=experts.dim, hidden_dim=experts.hidden_dim)
    for key, value in vars(experts).items():
        if not key.startswith("_") and key not in ("num_experts", "training") and not isinstance(
                value, (nn.Module, torch.Tensor)):
            setattr(local, key, value)
    for name, child in experts.named_children():
        local._modules[name] = child
    for name, p in experts.named_parameters(recurse=False):
        local._parameters[name] = nn.Parameter(p.detach()[lo:hi].clone(), requires_grad=p.requires_grad)
    local.train(experts.training)
    return local


class AllGatherExperts(nn.Module):
    """The popular port's expert parallelism, for comparison only (wrong backward).

    forward(x: (E, M, D)) -> (E, M, D): all-gather x along M from the ep ranks -> (E, ep*M, D);
    run this rank's El experts on every rank's items -> (El, ep*M, D); all-gather along E
    -> (E, ep*M, D); keep this rank's M items."""

    def __init__(self, experts: nn.Module, ep_rank: int, ep_size: int, group=None) -> None:
        super().__init__()
        El = experts.num_experts // ep_size
        self.lo, self.hi, self.ep_rank, self.group = ep_rank * El, (ep_rank + 1) * El, ep_rank, group
        self.local = _slice_experts(experts, self.lo, self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        E, M, D = x.shape
        xg = _PortAllGather.apply(x, 1, self.group)  # (E, ep*M, D)
        ys = self.local(xg[self.lo:self.hi])  # (El, ep*M, D)
        yg = _PortAllGather.apply(ys, 0, self.group)  # (E, ep*M, D)
        return yg[:, self.ep_rank * M:(self.ep_rank + 1) * M].contiguous()


# -- bytes on paper ---------------------------------------------------------------------------------
def bytes_per_step(design: str, ep: int, E: int, M: int, D: int, itemsize: int) -> int:
    """Bytes one rank receives from the other ranks in one forward + backward of one MoE layer,
    the expert input being (E, M, D) per rank (docs/distributed.md, "Cost model").

    a2a:    4 all-to-alls (2 forward, 2 backward), each receiving (ep-1)/ep of E*M*D.
    gather: 2 all-gathers in the forward, each receiving (ep-1)*E*M*D (every other rank's
            slots, then every other rank's expert outputs for all slots); the port's backward
            moves nothing (that is its bug; a correct one would add as much again)."""
    if ep == 1:
        return 0
    if design == "a2a":
        return 4 * (ep - 1) * (E // ep) * M * D * itemsize
    if design == "gather":
        return 2 * (ep - 1) * E * M * D * itemsize
    raise ValueError(f"design must be 'a2a' or 'gather', got {design!r}")


# -- the measuring worker -----------------------------------------------------------------------------
class _CollectiveMeter:
    """Wraps `torch.distributed.all_to_all_single` and `all_gather` (in this worker process only)
    to add up the seconds spent in them and the bytes they receive from other ranks."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.bytes = device, 0.0, 0
        self._saved = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather")}
        dist.all_to_all_single = self._timed(self._saved["all_to_all_single"], self._a2a_bytes)
        dist.all_gather = self._timed(self._saved["all_gather"], self._gather_bytes)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, fn, count):
        def wrapper(*args, **kwargs):
            self._sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds += time.perf_counter() - t0
            self.bytes += count(*args, **kwargs)
            return out
        return wrapper

    @staticmethod
    def _a2a_bytes(output, input, *args, group=None, **kwargs):
        n = dist.get_world_size(group)
        return output.numel() * output.element_size() * (n - 1) // n

    @staticmethod
    def _gather_bytes(parts, tensor, group=None, **kwargs):
        return (len(parts) - 1) * tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        self.seconds, self.bytes = 0.0, 0

    def close(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _worker(cfg: dict) -> None:
    from softmoe import distributed as smd
    from softmoe.layers import SoftMoE

    torch.set_num_threads(cfg["threads"])
    smd.init_process_group(init_method=cfg["init_method"], rank=cfg["rank"], world_size=cfg["world"], timeout_s=300)
    mesh = smd.init_mesh(cfg["world"])
    device = mesh.device
    meter = _CollectiveMeter(device)
    B, N, D, E, H = cfg["batch"], cfg["tokens"], cfg["dim"], cfg["experts"], cfg["hidden"]
    rows = []
    for design in ("a2a", "gather"):
        torch.manual_seed(0)
        layer = SoftMoE(D, E, hidden_dim=H).to(device)
        if mesh.world_size > 1:
            if design == "a2a":
                smd.parallelize(layer, mesh)
            else:
                layer.experts = AllGatherExperts(layer.experts, mesh.ep_rank, mesh.ep_size, mesh.ep_group)
        x = torch.randn(B, N, D, device=device, requires_grad=True)
        g = torch.randn(B, N, D, device=device)

        def step(layer=layer, x=x, g=g):
            layer.zero_grad(set_to_none=True)
            layer(x).backward(g)
            meter._sync()

        for _ in range(cfg["warmup"]):
            step()
        steps, comms, nbytes = [], [], []
        for _ in range(cfg["repeats"]):
            meter.reset()
            dist.barrier()
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            comms.append(meter.seconds)
            nbytes.append(meter.bytes)
        slowest = [None] * mesh.world_size  # a step takes as long as its slowest rank
        dist.all_gather_object(slowest, (statistics.median(steps), statistics.median(comms)))
        rows.append({"procs": mesh.world_size, "design": design, "step_ms": 1e3 * max(s for s, _ in slowest),
                     "comm_ms": 1e3 * max(c for _, c in slowest), "bytes_counted": nbytes[-1],
                     "bytes_model": bytes_per_step(design, mesh.ep_size, E, B, D, x.element_size())})
        if mesh.world_size == 1:
            break  # nothing to distribute: one row
    meter.close()
    if mesh.rank == 0:
        with open(cfg["result"], "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


# -- the command -----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("layer", "fsdp"), default="layer",
                        help="layer: one MoE layer, all-to-all vs all-gather (default); fsdp: training steps of a "
                             "model under EP + FSDP2 as softmoe train runs them")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4], help="process counts (default 1 2 4)")
    parser.add_argument("--dim", type=int, default=64, help="D (default 64)")
    parser.add_argument("--tokens", type=int, default=16, help="N tokens per sequence (default 16)")
    parser.add_argument("--experts", type=int, default=None,
                        help="E: layer mode: slots (P=1), divisible by every --procs (default 8); fsdp mode: "
                             "experts per MoE layer of --model (default: the model's)")
    parser.add_argument("--hidden", type=int, default=None, help="expert hidden width H (default 4*dim)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per process (default 8)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps (median; default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a launch is killed (default 600)")
    parser.add_argument("--out", default="bench_results",
                        help="output folder for distributed.md / .csv (fsdp mode: distributed_fsdp.md / .csv)")
    fsdp = parser.add_argument_group("--mode fsdp")
    fsdp.add_argument("--model", default="soft_moe_micro",
                      help="a Soft MoE ViT of the registry (default soft_moe_micro)")
    fsdp.add_argument("--layouts", nargs="+", default=None, metavar="DPxEP",
                      help="layouts to time, e.g. 1x1 2x1 1x2 (default: every dp x ep with dp*ep in --procs and ep "
                           "dividing the experts)")
    fsdp.add_argument("--global-batch", type=int, default=16,
                      help="images per step over all ranks, as softmoe train's batch_size (default 16)")
    fsdp.add_argument("--seed", type=int, default=0, help="model init and data seed (default 0)")
    fsdp.add_argument("--json", default=None, metavar="OUT",
                      help="also write the rows (with per-rank detail) to this JSON file")


def _check_args(args) -> None:
    if args.experts is None:
        args.experts = 8
    for name in ("dim", "tokens", "experts", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden is not None and args.hidden < 1:
        raise ValueError(f"--hidden must be >= 1, got {args.hidden}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    for p in args.procs:
        if p < 1 or args.experts % p:
            raise ValueError(f"--procs must be >= 1 and divide --experts={args.experts}, got {p}")
    if torch.cuda.is_available() and max(args.procs) > torch.cuda.device_count():
        raise ValueError(f"--procs {max(args.procs)} exceeds the {torch.cuda.device_count()} visible GPUs")


def _launch(procs: int, args, tmp: str) -> list[dict]:
    """Run `procs` worker processes and return rank 0's rows."""
    threads = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // procs)
    result = os.path.join(tmp, f"rows-{procs}.json")
    cfgs = [{"rank": rank, "world": procs, "init_method": f"file://{tmp}/store-{procs}", "threads": threads,
             "batch": args.batch, "tokens": args.tokens, "dim": args.dim, "experts": args.experts,
             "hidden": args.hidden or 4 * args.dim, "repeats": args.repeats, "warmup": args.warmup,
             "result": result} for rank in range(procs)]
    return _run_workers(cfgs, threads, args.timeout, result, f"{procs} processes")


def _run_workers(cfgs: list[dict], threads: int, timeout_s: float, result: str, what: str):
    """Run one worker process (this file as a script) per rank config; returns what rank 0 wrote to `result`."""
    commands = [[sys.executable, "-m", "softmoe.bench.distributed", json.dumps(cfg)] for cfg in cfgs]
    envs = [dict(os.environ, OMP_NUM_THREADS=str(threads), LOCAL_RANK=str(cfg["rank"])) for cfg in cfgs]
    codes = run_processes(commands, envs, timeout_s=timeout_s)
    if any(codes) or not os.path.exists(result):
        raise RuntimeError(f"benchmark workers for {what} failed (exit codes {codes})")
    with open(result) as f:
        return json.load(f)


def run(args) -> int:
    from softmoe._tables import write_table

    if args.mode == "fsdp":
        return run_fsdp(args)
    _check_args(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            rows += _launch(procs, args, tmp)
    a2a = {r["procs"]: r for r in rows if r["design"] == "a2a"}
    for r in rows:
        r["comm_fraction"] = r["comm_ms"] / r["step_ms"] if r["step_ms"] else None
        base = a2a.get(r["procs"])
        r["step_vs_a2a"] = r["step_ms"] / base["step_ms"] if base else None
        r["bytes_vs_a2a"] = r["bytes_model"] / base["bytes_model"] if base and base["bytes_model"] else None
        if r["bytes_counted"] != r["bytes_model"]:
            raise RuntimeError(f"bytes moved {r['bytes_counted']} differ from the cost model {r['bytes_model']}: {r}")
    hidden = args.hidden or 4 * args.dim
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    notes = [f"one Soft MoE layer, per process: batch {args.batch}, N={args.tokens}, D={args.dim}, E={args.experts} "
             f"(P=1), H={hidden}, float32; forward + backward; median of {args.repeats} steps, slowest rank",
             f"backend {backend}, {os.cpu_count()} CPU cores; processes x threads never exceed the cores when possible",
             "a2a: softmoe.distributed (all-to-all); gather: the port's all-gather design (its backward moves nothing "
             "and is wrong, see docs/distributed.md)",
             "bytes: received by one rank per step from other ranks; the cost model, checked equal to the bytes the "
             "collectives actually received"]
    columns = ["procs", "design", "step_ms", "comm_ms", "comm_fraction", "step_vs_a2a", "bytes_model", "bytes_vs_a2a"]
    md, csv_path = write_table(args.out, "distributed", columns, rows, "Expert parallelism: all-to-all vs all-gather",
                               notes)
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {csv_path}")
    return 0


# -- --mode fsdp -----------------------------------------------------------------------------------------
def layouts_for(args) -> list[tuple[int, int]]:
    """(dp, ep) of every --layouts entry "DPxEP", or by default every dp x ep with dp*ep in --procs
    and ep dividing `experts`, ordered by world size then ep."""
    if args.layouts is None:
        return [(p // ep, ep) for p in args.procs for ep in range(1, p + 1) if p % ep == 0 and
                args.experts % ep == 0]
    out = []
    for text in args.layouts:
        parts = text.lower().split("x")
        if len(parts) != 2 or not all(x.isdigit() and int(x) >= 1 for x in parts):
            raise ValueError(f"--layouts takes DPxEP entries such as 2x1 or 1x2 (positive integers), got {text!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _check_fsdp_args(args):
    """The checks of --mode fsdp, before any process starts; returns the model overrides."""
    from softmoe.layers import SoftMoE
    from softmoe.models import create_model, get_config

    for name in ("global_batch", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 in --mode fsdp (the first step runs FSDP's lazy initialisation), "
                         f"got {args.warmup}")
    for p in args.procs:
        if p < 1:
            raise ValueError(f"--procs must be >= 1, got {p}")
    if args.experts is not None and args.experts < 1:
        raise ValueError(f"--experts must be >= 1, got {args.experts}")
    overrides = {} if args.experts is None else {"moe": {"num_experts": args.experts}}
    try:
        vit = get_config(args.model, **overrides)
    except ValueError as e:
        raise ValueError(f"--model {args.model!r} / --experts {args.experts}: {e}") from None
    if getattr(vit, "moe", None) is None or not hasattr(vit, "img_size"):
        raise ValueError(f"--model must be a Soft MoE ViT of the registry, got {args.model!r} (no MoE layers)")
    with torch.device("meta"):
        model = create_model(args.model, **overrides)
    layers = [m for m in model.modules() if hasattr(m, "experts")]
    if not all(isinstance(m, SoftMoE) for m in layers):
        raise ValueError(f"--model must have Soft MoE layers (the byte model covers them), got {args.model!r} with "
                         f"{sorted({type(m).__name__ for m in layers})}")
    args.experts = vit.moe.num_experts
    for dp, ep in layouts_for(args):
        W = dp * ep
        if args.experts % ep:
            raise ValueError(f"--layouts {dp}x{ep}: ep={ep} must divide the {args.experts} experts per layer")
        if args.global_batch % W:
            raise ValueError(f"--global-batch {args.global_batch} must be divisible by every layout's dp*ep, got "
                             f"{dp}x{ep} = {W}")
        dims = {n: p.shape[1] for m in layers for n, p in m.experts.named_parameters(recurse=False)}
        if ep > 1 and any(d % dp for d in dims.values()):
            raise ValueError(f"--layouts {dp}x{ep}: FSDP cuts each expert parameter's dim 1 ({dims}) over dp={dp}; "
                             f"dp must divide them")
        if torch.cuda.is_available() and W > torch.cuda.device_count():
            raise ValueError(f"--layouts {dp}x{ep} needs {W} GPUs, {torch.cuda.device_count()} are visible")
    if args.json is not None:
        from softmoe._io import check_output_file

        check_output_file(args.json, "--json")
    return overrides


def _launch_fsdp(dp: int, ep: int, args, overrides: dict, tmp: str) -> dict:
    """Run one layout's dp*ep worker processes; returns rank 0's row."""
    world = dp * ep
    threads = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // world)
    result = os.path.join(tmp, f"row-{dp}x{ep}.json")
    cfgs = [{"mode": "fsdp", "rank": rank, "world": world, "dp": dp, "ep": ep, "threads": threads,
             "init_method": f"file://{tmp}/store-{dp}x{ep}", "timeout": min(300.0, args.timeout),
             "model": args.model, "overrides": overrides, "global_batch": args.global_batch, "seed": args.seed,
             "repeats": args.repeats, "warmup": args.warmup, "result": result} for rank in range(world)]
    return _run_workers(cfgs, threads, args.timeout, result, f"layout {dp}x{ep}")


FSDP_COLUMNS = ["layout", "world", "step_ms", "comm_blocking_ms", "comm_alone_ms", "all_to_all_MiB",
                "all_gather_MiB", "reduce_scatter_MiB", "all_reduce_KiB", "params_per_rank", "peak_mb",
                "peak_growth_mb", "loss"]


def run_fsdp(args) -> int:
    from softmoe._io import atomic_write_json
    from softmoe._tables import write_table
    from softmoe.bench._fsdp_steps import KINDS

    overrides = _check_fsdp_args(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dp, ep in layouts_for(args):
            rows.append(_launch_fsdp(dp, ep, args, overrides, tmp))
    for r in rows:
        wrong = {k: (r[f"{k}_bytes"], r[f"{k}_bytes_model"]) for k in KINDS if r[f"{k}_bytes"] != r[f"{k}_bytes_model"]}
        if wrong or r["other_calls"] or not r["bytes_equal_across_ranks"]:
            raise RuntimeError(f"layout {r['layout']}: bytes counted in the collectives differ from the byte model "
                               f"(counted, model) {wrong}, or {r['other_calls']} unmodelled collective calls, or "
                               f"ranks differ: {r}")
        for k in ("all_to_all", "all_gather", "reduce_scatter"):
            r[f"{k}_MiB"] = r[f"{k}_bytes"] / 2 ** 20
        r["all_reduce_KiB"] = r["all_reduce_bytes"] / 2 ** 10
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    notes = [f"{args.model}{f' with {args.experts} experts' if overrides else ''}, global batch {args.global_batch} "
             f"split over dp*ep ranks, float32; softmoe train's step (forward, backward, EP-aware clip, AdamW); "
             f"median of {args.repeats} steps after {args.warmup}, slowest rank",
             f"backend {backend}, {os.cpu_count()} CPU cores; processes x threads never exceed the cores when possible",
             "comm_blocking_ms: host time inside the step's collective calls (gloo: the calls block, so this is the "
             "communication the step waited for, skew included; NCCL: launch time only, the transfers overlap "
             "compute); comm_alone_ms: the same collectives replayed back to back without compute",
             "bytes: received by one rank per step, by kind, equal to the byte model (docs/distributed.md)",
             "params_per_rank: elements this rank holds (FSDP shards, padding excluded); peak_mb: "
             f"{rows[0]['memory_kind'] if rows else ''} high-water per rank (max), peak_growth_mb: above its start"]
    md, csv_path = write_table(args.out, "distributed_fsdp", FSDP_COLUMNS, rows,
                               "FSDP2 + expert parallelism: training steps per layout", notes)
    if args.json is not None:
        atomic_write_json(args.json, {"command": "bench distributed --mode fsdp", "notes": notes, "rows": rows})
    with open(md) as f:
        print(f.read())
    print(f"wrote {md} and {csv_path}" + (f" and {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    _cfg = json.loads(sys.argv[1])
    if _cfg.get("mode") == "fsdp":
        from softmoe.bench._fsdp_steps import worker

        worker(_cfg)
    else:
        _worker(_cfg)
