"""Running a comparison: one ordinary `softmoe train` work directory per (model, seed), run in
worker processes, resumable, followed by the per-run measurements the report needs.

Layout of the output folder:
    plan.json                   what is compared (models, sizes, recipe, seeds); a rerun with
                                another plan in the same folder is refused
    runs/<model>/seed<k>/       a training work directory (config.json, checkpoints/,
                                metrics.jsonl, summary.json, train.log)
    runs/<model>/seed<k>/compare_run.json
                                written last, atomically: the run is complete
A killed comparison rerun with the same command skips complete runs and resumes the others
from their last checkpoint (the trainer's exact resume).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from softmoe.eval.routing import group_size as _group
from softmoe.eval.routing import routing_diagnostics

from .family import arm_dirname
from .stats import pack_correct

RUN_RECORD = "compare_run.json"
PLAN = "plan.json"
# Images for the routing diagnostics, and for the train-split
# accuracy (the train-test gap): a fixed random subset of each split (seed 0, the same for
# every run; image folders are sorted by class, so the first images would be one or two
# classes), without augmentation.
DIAG_IMAGES = 256
TRAIN_EVAL_IMAGES = 10_000


@dataclass(frozen=True)
class Run:
    key: str  # model key (family.MODELS)
    seed: int
    workdir: str
    config: dict  # TrainConfig.to_dict()
    # a second copy of the finished run's record (e.g. under docs/results/, committed), from
    # which a comparison on another machine knows the run is done; None: the work directory only
    record_copy: str | None = None


def parse_seeds(text) -> list[int]:
    """`3` -> [0, 1, 2]; `"0,5,7"` -> [0, 5, 7]. Empty or negative: ValueError naming --seeds."""
    s = str(text).strip()
    if not s:
        raise ValueError("--seeds must be a count (e.g. 3) or a comma-separated list of seeds, got ''")
    try:
        if "," in s:
            seeds = [int(p) for p in s.split(",") if p.strip()]
        else:
            n = int(s)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise ValueError(f"--seeds must be a count >= 1 (e.g. 3) or a comma-separated list of seeds >= 0, "
                         f"got {text!r}") from None
    if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must list distinct seeds >= 0, got {text!r}")
    return seeds


def plan_runs(specs, seeds: dict[str, list[int]], base_cfg, out_dir: Path, records_dir: Path | None = None
              ) -> list[Run]:
    """One Run per (model, seed in seeds[model.key]): the shared recipe `base_cfg` (a
    TrainConfig) with the model, its overrides and the seed. `records_dir`: where each finished
    run's record is copied as <arm>/seed<k>.json."""
    import dataclasses

    from softmoe.train.config import ModelConfig

    runs = []
    for spec in specs:
        for seed in seeds[spec.key]:
            workdir = out_dir / "runs" / arm_dirname(spec.key) / f"seed{seed}"
            cfg = dataclasses.replace(base_cfg, model=ModelConfig(spec.model, dict(spec.overrides)), seed=seed,
                                      workdir=str(workdir))
            copy = str(Path(records_dir) / arm_dirname(spec.key) / f"seed{seed}.json") if records_dir else None
            runs.append(Run(spec.key, seed, str(workdir), cfg.validate().to_dict(), copy))
    return runs


# Plan entries a resumed comparison may change: more seeds or models extend it (each run's own
# config is still checked by `completed`); the rest (data, recipe, matching) must not change.
EXTENSIBLE = ("seeds", "ablation_seeds", "arm_seeds", "models")


def check_plan(out_dir: Path, plan: dict) -> None:
    """Check that the folder's plan (if any) is this one up to EXTENSIBLE entries, then write
    this plan to plan.json."""
    from softmoe._io import atomic_write_json

    path = out_dir / PLAN
    new = json.loads(json.dumps(plan))
    if path.is_file():
        old = json.loads(path.read_text())
        if "recipe" in old and "recipe" in new:  # a plan of an older release: its recipe as this release reads it
            old["recipe"] = _read_recipe(old["recipe"], new["recipe"])
        keys = sorted(k for k in set(old) | set(new) if k not in EXTENSIBLE and old.get(k) != new.get(k))
        if keys:
            raise ValueError(f"--out {str(out_dir)!r} holds another comparison (its plan differs in: "
                             f"{', '.join(keys)}); use another --out or the same command (more --seeds or "
                             f"--models may be added)")
        if old == new:
            return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, new, sort_keys=True)


def _read_recipe(old: dict, new: dict) -> dict:
    """`old` (a plan's recipe: TrainConfig fields but model, seed, workdir) with the defaults of the fields
    `new` has and `old` lacks (added since it was written), so that a new TrainConfig field never turns a
    resumable comparison into "another comparison" (`completed` reads run records the same way).
    Fields `old` sets keep their values."""
    from softmoe.train import TrainConfig

    defaults = TrainConfig().to_dict()
    return {**old, **{k: defaults[k] for k in new if k not in old and k in defaults}}


def completed(run: Run) -> dict | None:
    """The run's record if it finished with exactly this config (in its work directory, or else
    its record copy), else None."""
    rec = _completed_at(Path(run.workdir) / RUN_RECORD, run)
    if rec is None and run.record_copy:
        rec = _completed_at(Path(run.record_copy), run)
    return rec


def _completed_at(path: Path, run: Run) -> dict | None:
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if _what_is_trained(rec.get("config")) == _what_is_trained(run.config):
        return rec
    try:  # a record written by an older release: compare the configs as this release reads them
        from softmoe.train import TrainConfig

        same = (_what_is_trained(TrainConfig.from_dict(rec["config"]).to_dict())
                == _what_is_trained(TrainConfig.from_dict(run.config).to_dict()))
    except (KeyError, TypeError, ValueError):
        return None
    return rec if same else None


def _what_is_trained(config) -> dict | None:
    """A run config without its work directory: where a run was trained (another --out, another
    machine) does not change what was trained, so a committed record serves any --out."""
    return {k: v for k, v in config.items() if k != "workdir"} if isinstance(config, dict) else None


def train_run(run: Run):
    """Train one run (resuming if it was interrupted), its log in <workdir>/train.log: (config, summary, seconds)."""
    from softmoe.train import TrainConfig, train

    cfg = TrainConfig.from_dict(run.config)
    Path(run.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(Path(run.workdir) / "train.log", "a", encoding="utf-8") as f:
        summary = train(cfg, run.workdir, progress=False, log=lambda m: print(m, file=f, flush=True))
    return cfg, summary, time.perf_counter() - t0


def write_record(run: Run, record: dict) -> dict:
    """`record` written atomically into the run's workdir and, if asked, to its committed copy."""
    from softmoe._io import atomic_write_json

    atomic_write_json(Path(run.workdir) / RUN_RECORD, record, sort_keys=True)
    if run.record_copy:
        Path(run.record_copy).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(run.record_copy), record, sort_keys=True)
    return record


def execute(run: Run) -> dict:
    """Train one run (resuming if it was interrupted), measure it, write its record. A run that
    another command completed since this one planned (two commands sharing --records or --out)
    returns that record untouched: re-evaluating its final checkpoint would give the same
    accuracies but overwrite the record's training figures (loss, speed, wall time) with empty ones."""
    import torch

    done = completed(run)
    if done is not None:
        return done
    cfg, summary, seconds = train_run(run)
    threads = cfg.num_threads or torch.get_num_threads()
    measured = measure(run.workdir, cfg, threads)
    return write_record(run, {"key": run.key, "seed": run.seed, "config": run.config, "summary": summary,
                              "run_s": seconds, "history": history(run.workdir), **measured})


def history(workdir: str) -> list[dict]:
    """Every evaluation of the run (step, val/test accuracy, routing diagnostics router/...),
    from its metrics.jsonl: kept in the run record, so the report needs no work directory."""
    from softmoe.train.logs import read_metrics

    keep = ("step", "val_accuracy", "test_accuracy")
    return [{k: v for k, v in m.items() if k in keep or k.startswith("router/")}
            for m in read_metrics(workdir) if m.get("kind") == "eval"]


def measure(workdir: str, cfg, threads: int) -> dict:
    """Train-split accuracy (for the train-test gap) and routing diagnostics of the run's final
    model, each on a fixed random subset of a split, and its per-example correctness on the whole
    test set and validation split ("correct": {split: pack_correct(...)}, in the datasets' order:
    the paired statistics of softmoe.compare.stats). (Speed is measured side by side for all
    models at once afterwards: softmoe.compare.speed.)"""
    import torch

    from softmoe.data import load_dataset
    from softmoe.eval.loading import load_checkpoint, make_prepare

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, _ = load_checkpoint(workdir)
        kw = dict(root=cfg.data_root, download=False)
        train_ds = load_dataset(cfg.data, "train", **kw)
        test_ds = load_dataset(cfg.data, cfg.test_split, **kw)
        splits = {"test": test_ds}
        if cfg.val_split:
            from softmoe.data import split_train_val

            train_ds, splits["val"] = split_train_val(train_ds, cfg.val_split)
        prepare = make_prepare(model, train_ds.channels)
        train_acc = _accuracy(model, train_ds, prepare, TRAIN_EVAL_IMAGES, cfg.eval_batch_size)
        correct = {name: pack_correct(per_example_correct(model, ds, prepare, cfg.eval_batch_size))
                   for name, ds in splits.items()}
        x = prepare(test_ds.images[subset(len(test_ds), DIAG_IMAGES)])
        routing = routing_diagnostics(model, x)
    finally:
        torch.set_num_threads(prev)
    return {"train_accuracy": train_acc, "routing": routing, "correct": correct,
            "examples": {name: len(ds) for name, ds in splits.items()}}


def per_example_correct(model, ds, prepare, batch: int):
    """(n,) bool numpy array: whether the model's top-1 is right on each image, in order (the
    trainer's evaluation batches, so the same numbers as its final accuracy)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            logits = model(prepare(ds.images[i:i + batch]))
            out.append(logits.float().argmax(-1) == ds.labels[i:i + batch])
    return torch.cat(out).numpy()


def subset(n: int, k: int):
    """Sorted indices of a fixed random subset of min(k, n) of range(n) (seed 0)."""
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[: min(k, n)].sort().values


def _batches(n: int, size: int, group: int):
    """Batch boundaries over n items; every batch a multiple of `group` (the sparse layers'
    routing group) except that a remainder smaller than a group is dropped."""
    usable = n - n % group
    for i in range(0, usable, size):
        yield i, min(i + size, usable)


def _accuracy(model, ds, prepare, limit: int, batch: int) -> float:
    import torch

    idx = subset(len(ds), limit)
    group = _group(model)
    batch = max(group, batch - batch % group)
    correct = total = 0
    with torch.no_grad():
        for a, b in _batches(len(idx), batch, group):
            i = idx[a:b]
            logits = model(prepare(ds.images[i]))
            correct += int((logits.argmax(-1) == ds.labels[i]).sum())
            total += b - a
    return correct / total if total else float("nan")


def default_jobs(device: str, threads: int) -> int:
    """Parallel runs: one on a GPU; on CPU as many as the cores hold at `threads` each."""
    if device.startswith("cuda"):
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads))


def split_done(runs: list[Run], is_done) -> tuple[dict, list[Run]]:
    """({(key, seed): record} of the runs `is_done(run)` finds complete, the other runs in order)."""
    records, todo = {}, []
    for run in runs:
        rec = is_done(run)
        if rec is not None:
            records[(run.key, run.seed)] = rec
        else:
            todo.append(run)
    return records, todo


def run_all(runs: list[Run], jobs: int, log: Callable[[str], None] = print, report_only: bool = False) -> list[dict]:
    """Run what is not complete, `jobs` at a time in worker processes (spawned: no state is
    shared with this process); a progress line per run and an overall ETA. `report_only`:
    run nothing and return the complete runs' records (the report says what is missing)."""
    records, todo = split_done(runs, completed)
    if report_only:
        log(f"report only: {len(records)} of {len(runs)} runs complete"
            + (f"; missing: {', '.join(f'{r.key} seed {r.seed}' for r in todo)}" if todo else ""))
        return [records[(r.key, r.seed)] for r in runs if (r.key, r.seed) in records]
    if records:
        log(f"{len(records)} of {len(runs)} runs already complete; running the other {len(todo)}")
    durations: list[float] = []
    t_start = time.perf_counter()
    if todo:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(execute, run): run for run in todo}
            for run in todo[:jobs]:
                log(f"started {run.key} seed {run.seed} ({run.workdir})")
            for fut in cf.as_completed(futures):
                run = futures[fut]
                rec = fut.result()  # a failed run stops the comparison with its error
                records[(run.key, run.seed)] = rec
                durations.append(rec["run_s"])
                done = sum(1 for r in todo if (r.key, r.seed) in records)
                left = len(todo) - done
                elapsed = time.perf_counter() - t_start
                eta = elapsed / done * left if done else float("nan")
                log(f"[{len(records)}/{len(runs)}] {run.key} seed {run.seed}: test top-1 "
                    f"{100 * rec['summary']['test_accuracy']:.2f}% in {_fmt_s(rec['run_s'])}"
                    + (f"; ETA {_fmt_s(eta)} for {left} more" if left else ""))
    return [records[(r.key, r.seed)] for r in runs]


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
