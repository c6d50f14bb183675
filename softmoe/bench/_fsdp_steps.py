"""`softmoe bench distributed --mode fsdp`: whole training steps of a Soft MoE ViT parallelised as
`softmoe train` does it (experts over "ep", FSDP2), per (dp, ep) layout (docs/distributed.md,
"Benchmark: FSDP2 training steps").

One launch of W = dp * ep processes per layout (fresh processes: the CPU peak-RSS mark cannot
be reset). Each rank builds the model on the meta device, `softmoe.train.parallel.parallelize`s
it (world > 1; one process runs the trainer's plain single-process step, as `softmoe train`
without torchrun), materialises it with the keyed init, and times full steps through the
trainer's own `_train_step` (forward, backward, `finish_step`: ignored-gradient all-reduce,
EP-aware clip, AdamW). Every collective the step calls through `torch.distributed`
(FSDP2's all_gather_single / reduce_scatter_single, the experts' all_to_all_single, the
all_reduces of the clip and the logged values) is wrapped by `TrafficMeter`: bytes received
per rank by kind, host seconds inside the calls, and the call list, replayed alone afterwards.

Bytes per rank and step, the convention of bandwidth-optimal algorithms (what one rank receives
from the others): all-to-all (n-1)/n of its output, all-gather (n-1) x its input,
reduce-scatter (n-1) x its output, all-reduce 2 (n-1)/n of the tensor (ring: a reduce-scatter
then an all-gather), n the group's size. `step_bytes` computes the same numbers from the
model's shapes and the layout alone; the command fails if the two differ.
"""
from __future__ import annotations

import inspect
import json
import math
import statistics
import time
from fractions import Fraction

import torch
import torch.distributed as dist
from torch import nn

KINDS = ("all_to_all", "all_gather", "reduce_scatter", "all_reduce")
# torch.distributed function -> kind; the functions the step's code calls (FSDP2 in torch 2.14:
# all_gather_single / reduce_scatter_single; older torch: the *_tensor ones)
METERED = {"all_to_all_single": "all_to_all", "all_gather_single": "all_gather",
           "all_gather_into_tensor": "all_gather", "reduce_scatter_single": "reduce_scatter",
           "reduce_scatter_tensor": "reduce_scatter", "all_reduce": "all_reduce"}
# any of these inside a timed step is traffic the byte model does not know: counted as "other"
UNEXPECTED = ("all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather", "scatter",
              "send", "recv", "isend", "irecv", "batch_isend_irecv")


def _numbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _received(kind: str, bound: dict) -> Fraction:
    """Bytes one rank receives from the others in one call (the module docstring's convention)."""
    n = dist.get_world_size(bound.get("group"))
    if kind == "all_to_all":
        out = bound["output"]
        splits = bound.get("output_split_sizes")
        if splits:  # unequal splits: everything but my own block
            row = _numbytes(out) // max(1, out.shape[0])
            return Fraction(_numbytes(out) - splits[dist.get_rank(bound.get("group"))] * row)
        return Fraction(_numbytes(out) * (n - 1), n)
    if kind == "all_gather":
        return Fraction((n - 1) * _numbytes(bound["input_tensor"]))
    if kind == "reduce_scatter":
        out = bound["output"] if "output" in bound else bound["output_tensor"]
        return Fraction((n - 1) * _numbytes(out))
    return Fraction(2 * (n - 1) * _numbytes(bound["tensor"]), n)  # all_reduce


class TrafficMeter:
    """Wraps the `torch.distributed` collectives (this process only; `close()` restores them).
    While armed: bytes received by kind (exact `Fraction`s), the host seconds spent inside the
    calls, and each call (function, non-tensor arguments, tensor shapes) for `replay`. Calls of
    `UNEXPECTED` functions are counted in `other_calls`. Disarmed (setup, barriers, results):
    nothing is counted."""

    def __init__(self) -> None:
        self.armed = False
        self._saved = {}
        for name in (*METERED, *UNEXPECTED):
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, self._wrap(name, fn))
        self.reset()

    def reset(self) -> None:
        self.bytes = dict.fromkeys(KINDS, Fraction(0))
        self.seconds, self.calls, self.other_calls = 0.0, [], 0

    def _wrap(self, name: str, fn):
        kind = METERED.get(name)
        signature = inspect.signature(fn)

        def wrapper(*args, **kwargs):
            if not self.armed:
                return fn(*args, **kwargs)
            if kind is None:
                self.other_calls += 1
                return fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs).arguments
            self.bytes[kind] += _received(kind, bound)
            self.calls.append((name, {k: (v.shape, v.dtype, v.device) if isinstance(v, torch.Tensor) else v
                                      for k, v in bound.items()}))
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out
        return wrapper

    def replay(self, device: torch.device) -> float:
        """Seconds to run the recorded calls again, back to back, on fresh tensors of the same
        shapes, each synchronous (async_op False) and, on CUDA, synchronised: the step's
        communication with no compute to overlap it. Collective: every rank replays its list."""
        calls = [(self._saved[name], {k: torch.zeros(v[0], dtype=v[1], device=v[2]) if _is_spec(v) else v
                                      for k, v in spec.items()}) for name, spec in self.calls]
        for _, kwargs in calls:
            if "async_op" in kwargs:
                kwargs["async_op"] = False
        _sync(device)
        t0 = time.perf_counter()
        for fn, kwargs in calls:
            fn(**kwargs)
        _sync(device)
        return time.perf_counter() - t0

    def close(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _is_spec(v) -> bool:
    return isinstance(v, tuple) and len(v) == 3 and isinstance(v[0], torch.Size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- bytes on paper --------------------------------------------------------------------------------
def _ring(nbytes: int, n: int) -> Fraction:
    return Fraction(2 * (n - 1) * nbytes, n)


def _padded_shard(shape: torch.Size, dim: int, n: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter of `shape` cut along `dim` over n ranks,
    padding included (dim rounded up to a multiple of n)."""
    return math.ceil(shape[dim] / n) * math.prod(shape) // shape[dim]


def step_bytes(model: nn.Module, dp: int, ep: int, global_batch: int, itemsize: int = 4) -> dict[str, Fraction]:
    """Bytes one rank receives per training step, by kind, for `model` (an unparallelised Soft MoE
    ViT, e.g. built on the meta device) at layout dp x ep, computed from its shapes only (float32:
    `itemsize` 4). W = dp * ep, b = global_batch / W sequences per rank.

    all_to_all     per MoE layer 4 exchanges (2 forward, 2 backward) over ep of (E, P b, D):
                   4 (ep-1) (E/ep) P b D.
    FSDP units     (softmoe.distributed.apply_fsdp) each MoE layer's experts over dp (its ep shard
                   (E/ep, ...) cut along dim 1) when ep > 1; each block without them, and the root
                   (the rest), over all W ranks; 0-dim parameters left out. S = the unit's padded
                   shard (elements). all_gather: 2 (n-1) S (forward, and backward after
                   resharding, the root too: reshard_after_forward=True is given explicitly);
                   reduce_scatter: (n-1) S.
    all_reduce     (ring 2 (n-1)/n of the tensor): the loss (float32) and the correct count
                   (int64) over W; the 0-dim gradients (float32 each, one tensor) over W; the clip's
                   squared norms, one float32 per distinct set of process groups: over W for the
                   dense-sharded gradients and, when ep > 1, over each expert shard group of more
                   than one rank (dp, ep), unless that is the world itself (dp = 1: a DeviceMesh
                   dimension spanning the world is the world group, so the clip sums both at once).
    """
    from softmoe.distributed.fsdp import transformer_blocks
    from softmoe.layers import MoELayer, SoftMoE

    W = dp * ep
    out = dict.fromkeys(KINDS, Fraction(0))
    if W == 1:
        return out
    b = global_batch // W
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    expert_ids = set()
    units = []  # (group size, padded shard elements)
    for layer in layers:
        if not isinstance(layer, SoftMoE):
            raise ValueError(f"the FSDP benchmark models Soft MoE layers only, got {type(layer).__name__}")
        if ep > 1:
            E, P = layer.num_experts, layer.slots_per_expert
            out["all_to_all"] += 4 * (ep - 1) * (E // ep) * P * b * layer.dim * itemsize
            params = list(layer.experts.parameters(recurse=False))
            expert_ids |= {id(p) for p in params}
            units.append((dp, sum(_padded_shard(torch.Size((p.shape[0] // ep, *p.shape[1:])), 1, dp)
                                  for p in params)))
    ignored = {id(p) for p in model.parameters() if p.dim() == 0}
    taken = set(expert_ids | ignored)
    for block in [*transformer_blocks(model), model]:
        params = [p for p in block.parameters() if id(p) not in taken]
        taken |= {id(p) for p in params}
        units.append((W, sum(_padded_shard(p.shape, 0, W) for p in params)))
    for n, S in units:
        out["all_gather"] += 2 * (n - 1) * S * itemsize
        out["reduce_scatter"] += (n - 1) * S * itemsize
    out["all_reduce"] += _ring(4, W) + _ring(8, W)  # loss, correct
    n_ignored = sum(1 for p in model.parameters() if p.dim() == 0 and p.requires_grad)
    if n_ignored:
        out["all_reduce"] += _ring(4 * n_ignored, W)
    out["all_reduce"] += _ring(4, W)  # clip: the dense-sharded squared norms, over the world group
    expert_groups = [n for n in (dp, ep) if n > 1] if ep > 1 else []
    if expert_groups != [W]:  # dp = 1: the experts' one group is the world group, summed with the dense ones
        out["all_reduce"] += sum((_ring(4, n) for n in expert_groups), Fraction(0))
    return out


def as_number(x: Fraction):
    """An exact byte count for JSON: an int when whole, else a float."""
    return int(x) if x.denominator == 1 else float(x)


# -- the worker ---------------------------------------------------------------------------------------
def _batches(cfg: dict, vit, steps: int, rows: tuple[int, int], device):
    """`steps` global batches (images (B, C, H, W), labels (B,)) drawn from one seeded generator
    (the same numbers at every layout); this rank's rows of each, on `device`."""
    g = torch.Generator().manual_seed(cfg["seed"])
    B, (lo, hi) = cfg["global_batch"], rows
    out = []
    for _ in range(steps):
        x = torch.randn(B, vit.in_chans, vit.img_size, vit.img_size, generator=g)
        y = torch.randint(0, vit.num_classes, (B,), generator=g)
        out.append((x[lo:hi].to(device), y[lo:hi].to(device)))
    return out


def _build(cfg: dict, mesh, device):
    """The model and the trainer's _Run around it, set up as softmoe train's _setup_run does."""
    from softmoe import distributed as smd
    from softmoe.layers import moe_layers, set_buffer_reuse
    from softmoe.train import parallel
    from softmoe.train.config import ModelConfig, TrainConfig
    from softmoe.train.optim import build_optimizer
    from softmoe.train.trainer import _Run

    tcfg = TrainConfig(model=ModelConfig(cfg["model"], cfg["overrides"]), batch_size=cfg["global_batch"],
                       seed=cfg["seed"], ep_size=cfg["ep"], data_parallel="fsdp")
    torch.manual_seed(tcfg.seed)
    with torch.device("meta"):
        model = tcfg.model.build()
    if mesh is not None:
        parallel.parallelize(model, mesh, tcfg.data_parallel)
    smd.materialize(model, device, tcfg.seed)
    if mesh is not None:
        smd.key_noise_by_global_rows(model, parallel.rows(mesh, tcfg.batch_size), tcfg.batch_size)
    model.train()
    set_buffer_reuse(model, tcfg.reuse_buffers)
    run = _Run(cfg=tcfg, workdir=None, device=device, use_bf16=False, train_ds=None, test_ds=None, val_ds=None,
               model=model, optimizer=build_optimizer(model, tcfg), loader=None, schedule=None, total=0,
               steps_per_epoch=0, params=[p for p in model.parameters() if p.requires_grad],
               moe=[m for _, m in moe_layers(model)], mesh=mesh)
    return run


def _local_params(model: nn.Module) -> int:
    from softmoe.distributed import local

    return sum(local(p).numel() for p in model.parameters())


def worker(cfg: dict) -> None:
    """One rank of one layout: time the steps, then rank 0 writes the layout's row to cfg["result"]."""
    from softmoe import distributed as smd
    from softmoe.models import create_model
    from softmoe.train import parallel
    from softmoe.train.memory import PeakMemory
    from softmoe.train.trainer import _train_step

    torch.set_num_threads(cfg["threads"])
    W, dp, ep = cfg["world"], cfg["dp"], cfg["ep"]
    smd.init_process_group(init_method=cfg["init_method"], rank=cfg["rank"], world_size=W, timeout_s=cfg["timeout"])
    mesh = smd.init_mesh(ep, timeout_s=cfg["timeout"]) if W > 1 else None  # one process: softmoe train's plain run
    device = mesh.device if mesh is not None else (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
    memory = PeakMemory(device)  # before the model exists, as the trainer
    meter = TrafficMeter()
    run = _build(cfg, mesh, device)
    steps = cfg["warmup"] + cfg["repeats"]
    batches = _batches(cfg, run.model.config, steps, parallel.rows(mesh, cfg["global_batch"]) or
                       (0, cfg["global_batch"]), device)
    lr = run.cfg.lr
    times, comm, counts, losses = [], [], [], []
    for i, (x, y) in enumerate(batches):
        dist.barrier()  # every rank starts the step together (not metered)
        _sync(device)
        timed = i >= cfg["warmup"]
        meter.reset()
        meter.armed = timed
        t0 = time.perf_counter()
        out = _train_step(run, x, y, lr, routing=False)
        _sync(device)
        elapsed = time.perf_counter() - t0
        meter.armed = False
        losses.append(float(out.loss))
        if timed:
            times.append(elapsed)
            comm.append(meter.seconds)
            counts.append((dict(meter.bytes), meter.other_calls))
    if any(c != counts[-1] for c in counts):
        raise RuntimeError(f"the collectives' bytes differ between timed steps: {counts}")
    dist.barrier()
    replays = [meter.replay(device) for _ in range(cfg["repeats"])] if W > 1 else [0.0]
    meter.close()
    mine = {"step_s": statistics.median(times), "comm_s": statistics.median(comm),
            "replay_s": statistics.median(replays), "bytes": {k: str(v) for k, v in counts[-1][0].items()},
            "other_calls": counts[-1][1], "params": _local_params(run.model), "memory": memory.read(),
            "loss": losses[-1]}
    ranks = [None] * W
    dist.all_gather_object(ranks, mine)
    if cfg["rank"] == 0:
        with torch.device("meta"):
            reference = create_model(cfg["model"], **cfg["overrides"])
        model_bytes = step_bytes(reference, dp, ep, cfg["global_batch"])
        counted = {k: max(Fraction(r["bytes"][k]) for r in ranks) for k in KINDS}
        row = {"layout": f"{dp}x{ep}", "world": W, "dp": dp, "ep": ep,
               "step_ms": 1e3 * max(r["step_s"] for r in ranks),
               "comm_blocking_ms": 1e3 * max(r["comm_s"] for r in ranks),
               "comm_alone_ms": 1e3 * max(r["replay_s"] for r in ranks),
               **{f"{k}_bytes": as_number(counted[k]) for k in KINDS},
               **{f"{k}_bytes_model": as_number(model_bytes[k]) for k in KINDS},
               "total_bytes": as_number(sum(counted.values())),
               "bytes_equal_across_ranks": all(r["bytes"] == ranks[0]["bytes"] for r in ranks),
               "other_calls": max(r["other_calls"] for r in ranks),
               "params_per_rank": max(r["params"] for r in ranks), "params_total": sum(
                   p.numel() for p in reference.parameters()),
               "peak_mb": max(r["memory"]["peak_mb"] for r in ranks),
               "peak_growth_mb": max(r["memory"]["peak_mb"] - r["memory"]["start_mb"] for r in ranks),
               "memory_kind": ranks[0]["memory"]["kind"], "loss": ranks[0]["loss"],
               "per_rank": [{"step_ms": 1e3 * r["step_s"], "comm_blocking_ms": 1e3 * r["comm_s"],
                             "comm_alone_ms": 1e3 * r["replay_s"], "params": r["params"],
                             "start_mb": r["memory"]["start_mb"], "peak_mb": r["memory"]["peak_mb"]} for r in ranks]}
        with open(cfg["result"], "w") as f:
            json.dump(row, f)
    parallel.close_process_group(finished=True)
