"""The data / compute split of training steps, measured without a host sync per step.

On the CPU every op runs when it is called, so host clocks (time.perf_counter) measure the
work. On CUDA the host only queues kernels: its clock would time the queueing and charge a
blocking copy's wait for the previous step to data time. There, each step records three CUDA
events (before the batch, after the batch, after the step) and the elapsed times are read only
in `collect`, which the trainer calls after it has synced anyway (at a log, evaluation or
checkpoint step): the device's own time for the data and compute work of each step.
"""
from __future__ import annotations

import time

import torch


class StepClock:
    """`start()`, `data_done()`, `step_done()` around each step; `collect()` -> (data_s, step_s,
    steps): the seconds of the steps finished since the last collect (on CUDA: device time
    between the events; call it only once the device has finished those steps)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list = []  # per step: (start, data done, step done), events or floats
        self._cur: list = []

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def start(self) -> None:
        self._cur = [self._now()]

    def data_done(self) -> None:
        self._cur.append(self._now())

    def step_done(self) -> None:
        self._cur.append(self._now())
        self._marks.append(tuple(self._cur))
        self._cur = []

    def collect(self) -> tuple[float, float, int]:
        data_s = step_s = 0.0
        for t0, t1, t2 in self._marks:
            if self.cuda:
                data_s += t0.elapsed_time(t1) / 1e3  # ms -> s
                step_s += t1.elapsed_time(t2) / 1e3
            else:
                data_s += t1 - t0
                step_s += t2 - t1
        n = len(self._marks)
        self._marks = []
        return data_s, step_s, n
