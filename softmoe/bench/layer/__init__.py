"""Layer benchmark: SoftMoE against a naive per-expert loop and the PyPI ports (time, GFLOP/s, peak memory).

For each number of experts E (the paper's S/16 shape B=32, N=196, D=384, H=1536, P=1 and
E in {8, 32, 128, 512}), every implementation gets the same input and is timed forward
(no_grad) and forward+backward (input requires grad, parameter grads set to None before each
step as `optimizer.zero_grad()` does). Implementations are timed side by side, round-robin,
so that machine noise hits all of them alike; medians are reported. Each implementation runs
in a worker process of its own (`--same-process`: all in this one), because in one process
their allocations change each other's page faults. Peak memory is measured in a fresh
subprocess per (implementation, E). Times are also given as GFLOP/s of the
layer's nominal matmul FLOPs and as a fraction of this machine's large-matmul rate measured
in the same run.

Implementations:
  softmoe           this project's SoftMoE (stacked experts, batched matmuls).
  naive-loop        the same function with a Python loop over per-expert nn.Sequential MLPs
                    (`NaiveSoftMoE`; a baseline, deliberately unoptimised).
  soft-moe-pytorch  lucidrains' port (`pip install soft-moe-pytorch`), when installed.
  soft-moe          bwconrad's port (`pip install soft-moe`), when installed.
"""
# One job per file: naive.py (the reference model), ports.py (the two PyPI ports),
# impls.py (shape, FLOPs, the implementations and one step of each), workers.py (timing in
# worker processes, round-robin), memory.py (the peak-RSS subprocess), command.py (options,
# table and report of `softmoe bench layer`).
from .command import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
