"""`softmoe compare --task lm`: decoders of the zoo trained on one corpus with one recipe, several
seeds each, held-out bits per character compared with the paired bootstrap (docs/design.md §8.6).

    from softmoe.compare.lm import compare_lm
    report = compare_lm("charlm", "runs/cmp_lm", models="gpt_micro,soft_moe_gpt_micro,"
                        "soft_moe_gpt_micro:rotate=false", seeds=3, steps=800, records_dir="docs/results/charlm")

Arms are decoder names with GPTConfig overrides, `MODEL[:KEY=VALUE...]` (the vision compare's
syntax, softmoe/compare/family.py `split_arm`); the first arm is the reference and must be
dense. Every arm's forward FLOPs per sequence of block_size tokens, as the zoo's profiler counts
them (softmoe/models/profile.py `gpt_flop_breakdown`: every matmul, the attention mix, router
logits, dispatch and combine), must lie within `flops_tolerance` of the reference's: matched
FLOPs is checked, not assumed. FlopCounterMode on a real forward is recorded beside it (on the
CPU it does not count scaled_dot_product_attention, the same in every arm).

Each run is an ordinary `softmoe train` work directory (task "lm": resumable from its
checkpoints) under OUT/runs/<arm>/seed<k>/; its record (config, summary with the per-window
bits of the validation and test splits) is written last, atomically, to compare_run.json there
and, with `records_dir`, to records_dir/<arm>/seed<k>.json: a run whose record exists is never
trained again, on any machine. The report (report.md, report.json in OUT, and in records_dir)
gives, per split, each arm's bpc (mean ± std over seeds) teacher-forced and prefix-only, its
difference to the reference with the paired bootstrap over held-out windows and seeds
(softmoe/compare/stats.py `paired_bootstrap_values`), the held-out characters, the smallest
difference they resolve, the leak gap, and training tokens/s (each run's own, and measured
side by side in one process at the end).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from .family import split_arm
from .runner import RUN_RECORD, Run, check_plan, parse_seeds, plan_runs, split_done, train_run, write_record
from .stats import paired_bootstrap_values, summarize

DEFAULT_ARMS = "gpt_micro,soft_moe_gpt_micro,soft_moe_gpt_micro:rotate=false"
REPORT_MD, REPORT_JSON = "report.md", "report.json"
SPLIT_WORDS = {"val": "validation (decisions)", "test": "test (reported once)"}
SPEED_WARMUP, SPEED_STEPS, SPEED_ROUNDS = 2, 5, 3


@dataclass(frozen=True)
class LMArm:
    """One arm: a decoder name plus GPTConfig overrides, with its size and cost."""
    key: str
    model: str
    overrides: dict = field(default_factory=dict)
    description: str = ""
    params: int = 0
    flops: float = 0.0  # forward FLOPs per sequence of block_size tokens (the zoo's profiler)
    flops_counted: float = 0.0  # the same forward under FlopCounterMode (no SDPA on the CPU)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def forward_flops(model, tokens: int) -> int:
    """FLOPs (multiply-add = 2, matmuls only) of one forward over a (1, tokens) sequence, as
    torch.utils.flop_counter.FlopCounterMode counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    idx = torch.zeros(1, tokens, dtype=torch.int64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(idx)
    return int(counter.get_total_flops())


def describe(cfg) -> str:
    if cfg.moe_type is None:
        return f"dense GPT, MLP {cfg.embed_dim}->{cfg.mlp_dim}"
    chunk = cfg.chunk_size or cfg.num_experts * cfg.slots_per_expert
    slots = cfg.num_experts * cfg.slots_per_expert
    return (f"{cfg.moe_type} in blocks {list(cfg.moe_blocks)}: E={cfg.num_experts}, P={cfg.slots_per_expert}, "
            f"S={slots} slots per chunk of C={chunk} tokens, rotate={cfg.rotate}")


def build_arms(text: str | None, flops_tolerance: float = 0.05) -> tuple[list[LMArm], dict]:
    """The arms of `text` (comma-separated MODEL[:KEY=VALUE...]; None: DEFAULT_ARMS), sized and
    costed, and the matching record. The first arm is the reference (dense); any arm whose
    FLOPs differ from it by more than `flops_tolerance` (relative) is a ValueError."""
    import torch

    from softmoe.models.gpt import create_decoder, list_decoders
    from softmoe.models.profile import count_flops

    keys = [k.strip() for k in (text or DEFAULT_ARMS).split(",") if k.strip()]
    if not keys or len(set(keys)) != len(keys):
        raise ValueError(f"--models must list distinct decoder arms, e.g. {DEFAULT_ARMS!r}, got {text!r}")
    if not (isinstance(flops_tolerance, (int, float)) and 0 <= flops_tolerance < 1):
        raise ValueError(f"--flops-tolerance must be in [0, 1), got {flops_tolerance!r}")
    arms = []
    for key in keys:
        name, options = split_arm(key)
        if name not in list_decoders():
            raise ValueError(f"--models: {name!r} is not a decoder; one of {list_decoders()} (task lm)")
        with torch.random.fork_rng():
            model = create_decoder(name, **options)
        cfg = model.config
        arms.append(LMArm(key, name, dict(options), describe(cfg), sum(p.numel() for p in model.parameters()),
                          float(count_flops(cfg)), float(forward_flops(model, cfg.block_size))))
    ref = arms[0]
    from softmoe.models.gpt import get_decoder_config

    if get_decoder_config(ref.model, **ref.overrides).moe_type is not None:
        raise ValueError(f"--models: the first arm is the reference and must be dense (e.g. gpt_micro), "
                         f"got {ref.key!r}")
    blocks = {get_decoder_config(a.model, **a.overrides).block_size for a in arms}
    if len(blocks) != 1:
        raise ValueError(f"--models: every arm must have the same block_size (context), got {sorted(blocks)}")
    for a in arms[1:]:
        if abs(a.flops / ref.flops - 1) > flops_tolerance:
            raise ValueError(f"arm {a.key!r} costs {a.flops / ref.flops:.3f}x the reference's forward FLOPs, more than "
                             f"--flops-tolerance={flops_tolerance} away; use chunk_size = slots (S = C) to match")
    matching = {"reference": ref.key, "reference_flops": ref.flops, "tokens": blocks.pop(),
                "ratios": {a.key: a.flops / ref.flops for a in arms}, "tolerance": flops_tolerance,
                "flop_counter_ratios": {a.key: a.flops_counted / ref.flops_counted for a in arms},
                "matching": "forward FLOPs per sequence, the zoo's profiler (matmuls, attention, routing included)"}
    return arms, matching


def completed(run: Run) -> dict | None:
    """The run's record if it finished with this config up to where its work directory was (in
    the work directory, or else the record copy), else None: a record made under another --out,
    or on another machine, still counts."""
    def same(rec) -> bool:
        from softmoe.train import TrainConfig

        try:
            a, b = (TrainConfig.from_dict(c).to_dict() for c in (rec["config"], run.config))
        except (KeyError, TypeError, ValueError):
            return False
        return {k: v for k, v in a.items() if k != "workdir"} == {k: v for k, v in b.items() if k != "workdir"}

    for path in (Path(run.workdir) / RUN_RECORD, Path(run.record_copy) if run.record_copy else None):
        if path is None or not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and same(rec):
            return rec
    return None


def execute_lm(run: Run) -> dict:
    """Train one run (resuming an interrupted one) and write its record."""
    _, summary, seconds = train_run(run)
    return write_record(run, {"key": run.key, "seed": run.seed, "config": run.config, "summary": summary,
                              "run_s": seconds})


def run_serial(runs: list[Run], log, report_only: bool = False) -> list[dict]:
    """Run what is not complete, one at a time, each in a fresh spawned process (as the vision
    compare: no state shared with this process). Returns the complete runs' records."""
    import concurrent.futures as cf
    import multiprocessing

    records, todo = split_done(runs, completed)
    if report_only:
        log(f"report only: {len(records)} of {len(runs)} runs complete")
        return [records[(r.key, r.seed)] for r in runs if (r.key, r.seed) in records]
    if records:
        log(f"{len(records)} of {len(runs)} runs already complete; running the other {len(todo)}")
    # seed-major (every arm's seed 0, then every arm's seed 1, ...): a study stopped early has
    # the same seeds of every arm, so its partial report still pairs them
    order = {run.key: i for i, run in enumerate(runs)}
    todo.sort(key=lambda r: (r.seed, order[r.key]))
    ctx = multiprocessing.get_context("spawn")
    for run in todo:
        log(f"started {run.key} seed {run.seed} ({run.workdir})")
        with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rec = pool.submit(execute_lm, run).result()
        records[(run.key, run.seed)] = rec
        s = rec["summary"]
        log(f"[{len(records)}/{len(runs)}] {run.key} seed {run.seed}: validation bpc {s['val_bpc_teacher_forced']:.4f}"
            f" in {rec['run_s']:.0f}s ({s['train_tokens_per_s']:,.0f} train tokens/s)")
    return [records[(r.key, r.seed)] for r in runs]


def measure_speed_lm(arms: list[LMArm], batch_size: int, threads: int, log=print) -> dict:
    """Training tokens/s of every arm measured side by side in this process: SPEED_ROUNDS rounds,
    each timing SPEED_STEPS training steps (forward, backward, AdamW) of every arm in turn after
    SPEED_WARMUP untimed ones; the median round per arm. Interleaving the arms spreads a loaded
    machine's noise over all of them alike."""
    import torch
    import torch.nn.functional as F

    from softmoe.models.gpt import create_decoder

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        built = []
        with torch.random.fork_rng():
            torch.manual_seed(0)
            for a in arms:
                m = create_decoder(a.model, **a.overrides).train()
                built.append((a, m, torch.optim.AdamW(m.parameters(), lr=1e-4)))
        T = built[0][1].config.block_size
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (batch_size, T), generator=g)
        y = torch.randint(0, 256, (batch_size, T), generator=g)

        def steps(m, opt, n):
            for _ in range(n):
                loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        for _, m, opt in built:
            steps(m, opt, SPEED_WARMUP)
        times = {a.key: [] for a in arms}
        for _ in range(SPEED_ROUNDS):
            for a, m, opt in built:
                t0 = time.perf_counter()
                steps(m, opt, SPEED_STEPS)
                times[a.key].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    out = {k: SPEED_STEPS * batch_size * T / statistics.median(v) for k, v in times.items()}
    log("side-by-side training tokens/s: " + ", ".join(f"{k} {v:,.0f}" for k, v in out.items()))
    return {"train_tokens_per_s": out, "batch_size": batch_size, "tokens": T, "threads": threads,
            "method": f"median of {SPEED_ROUNDS} interleaved rounds of {SPEED_STEPS} steps after {SPEED_WARMUP} "
                      f"warm-up steps, one process"}


def _arm_values(records: list[dict], key: str, split: str, kind: str) -> dict[int, list[float]]:
    return {r["seed"]: r["summary"]["eval"][split][f"window_bits_{kind}"] for r in records if r["key"] == key}


def build_report(plan: dict, arms: list[LMArm], records: list[dict], speed: dict | None) -> dict:
    """The report dict: per split and arm, bpc summaries and the paired differences to the reference."""
    ref = arms[0].key
    out = {"plan": plan, "reference": ref, "arms": [], "speed": speed}
    for a in arms:
        recs = [r for r in records if r["key"] == a.key]
        entry = {**a.to_dict(), "flops_ratio": plan["matching"]["ratios"][a.key], "seeds": [r["seed"] for r in recs]}
        if recs:
            entry["train_tokens_per_s_runs"] = summarize([r["summary"]["train_tokens_per_s"] for r in recs]).to_dict()
            if speed:
                entry["train_tokens_per_s_side_by_side"] = speed["train_tokens_per_s"][a.key]
            for split in ("val", "test"):
                ev = [r["summary"]["eval"][split] for r in recs]
                s = {"characters": ev[0]["characters"], "windows": ev[0]["windows"],
                     "prefix_windows": len(ev[0]["prefix_windows"]),
                     "bpc_teacher_forced": summarize([e["bpc_teacher_forced"] for e in ev]).to_dict(),
                     "bpc_prefix_only": summarize([e["bpc_prefix_only"] for e in ev]).to_dict(),
                     "leak_gap_bpc": summarize([e["leak_gap_bpc"] for e in ev]).to_dict()}
                if a.key != ref and any(r["key"] == ref for r in records):
                    for kind in ("teacher_forced", "prefix_only"):
                        d = paired_bootstrap_values(_arm_values(records, a.key, split, kind),
                                                    _arm_values(records, ref, split, kind))
                        chars = s["characters"] if kind == "teacher_forced" else s["prefix_windows"] * plan["tokens"]
                        s[f"vs_reference_{kind}"] = {**d.to_dict(), "characters": chars,
                                                     "words": d.words(ref, characters=chars)}
                entry[split] = s
        out["arms"].append(entry)
    return out


def _pm(s: dict, digits: int = 4) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def markdown(report: dict) -> str:
    plan = report["plan"]
    lines = [f"# Char-LM comparison: {plan['data']} ({plan['steps']} steps of {plan['batch_size']}x{plan['tokens']} "
             f"tokens, seeds {plan['seeds']})", "",
             f"Command: `{plan['command']}`", "",
             f"Reference: {report['reference']}. Matched cost: {plan['matching']['matching']}; ratios "
             + ", ".join(f"{k} {v:.4f}x" for k, v in plan["matching"]["ratios"].items())
             + " (FlopCounterMode, which skips the attention mix on the CPU: "
             + ", ".join(f"{k} {v:.4f}x" for k, v in plan["matching"].get("flop_counter_ratios", {}).items())
             + ").", "",
             "Statistics: paired bootstrap over held-out windows (the same windows for both arms) and seeds "
             f"({plan['bootstrap']}); a difference is claimed only when the 95% interval excludes 0 by "
             f"{plan['claim_margin_bits']} bits/char. Lower bpc is better.", ""]
    for split in ("val", "test"):
        first = next((a[split] for a in report["arms"] if split in a), None)
        if first is None:
            continue
        lines += [f"## {SPLIT_WORDS[split]}: {first['windows']} windows, {first['characters']:,} characters "
                  f"(prefix-only: {first['prefix_windows']} windows, {first['prefix_windows'] * plan['tokens']:,} "
                  f"characters)", "",
                  "| arm | seeds | bpc teacher-forced | bpc prefix-only | leak gap | vs reference (teacher-forced) |",
                  "|---|---|---|---|---|---|"]
        for a in report["arms"]:
            if split not in a:
                continue
            s = a[split]
            vs = s.get("vs_reference_teacher_forced")
            lines.append(f"| {a['key']} | {len(a['seeds'])} | {_pm(s['bpc_teacher_forced'])} | "
                         f"{_pm(s['bpc_prefix_only'])} | {_pm(s['leak_gap_bpc'], 6)} | "
                         f"{vs['words'] if vs else 'reference'} |")
        lines.append("")
        for a in report["arms"]:
            vs = a.get(split, {}).get("vs_reference_prefix_only")
            if vs:
                lines.append(f"- {a['key']}, prefix-only: {vs['words']}")
        lines.append("")
    lines += ["## Cost and speed", "", "| arm | params | forward FLOPs/seq | x reference | train tokens/s (runs) | "
              "train tokens/s (side by side) | description |", "|---|---|---|---|---|---|---|"]
    for a in report["arms"]:
        runs = a.get("train_tokens_per_s_runs")
        side = a.get("train_tokens_per_s_side_by_side")
        lines.append(f"| {a['key']} | {a['params']:,} | {a['flops'] / 1e6:.2f} M | {a['flops_ratio']:.3f} | "
                     f"{_pm(runs, 0) if runs else '-'} | {f'{side:,.0f}' if side else '-'} | {a['description']} |")
    if report.get("speed"):
        lines += ["", f"Side by side: {report['speed']['method']}, {report['speed']['threads']} thread(s)."]
    if plan.get("missing_runs"):
        lines += ["", f"Missing runs: {', '.join(plan['missing_runs'])}."]
    return "\n".join(lines) + "\n"


def compare_lm(config: str = "charlm", out_dir: str | Path = "runs/compare_lm", *, models: str | None = None,
               seeds="3", steps: int = 0, overrides: list[str] | None = None, threads: int = 1,
               flops_tolerance: float = 0.05, records_dir: str | Path | None = None, report_only: bool = False,
               speed: bool = True, command: str = "", log=print) -> dict:
    """Run (or resume) an LM comparison and write its report; returns the report dict. The recipe
    is the training config `config` (a configs/ name or a .py file, task "lm") with `steps` and
    the `overrides` (`key=value`, as `softmoe train --set`), the same for every arm."""
    from softmoe._io import atomic_write_json, atomic_write_text
    from softmoe.train import apply_overrides, load_config

    from .stats import BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, CLAIM_MARGIN_BITS

    seed_list = parse_seeds(seeds)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads!r}")
    for o in overrides or []:
        key = str(o).split("=", 1)[0].strip().split(".")[0]
        if key in ("model", "model_kwargs", "seed", "workdir", "num_threads", "task"):
            raise ValueError(f"--set {key}=... is chosen by compare itself (use --models, --seeds, --out, --threads)")
    cfg = load_config(config)
    if cfg.task != "lm":
        raise ValueError(f"--config {config!r} is a task={cfg.task!r} config; --task lm needs a task='lm' one "
                         f"(e.g. charlm)")
    cfg = dataclasses.replace(cfg, num_threads=threads, **({"steps": steps} if steps else {}))
    cfg = dataclasses.replace(cfg, checkpoint_every=max(1, cfg.steps // 10))  # resumable: a checkpoint every tenth
    cfg = apply_overrides(cfg, list(overrides or [])).validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a directory")
    arms, matching = build_arms(models, flops_tolerance)
    runs = plan_runs(arms, {a.key: seed_list for a in arms}, cfg, out_dir,
                     Path(records_dir) if records_dir else None)
    recipe = {k: v for k, v in cfg.to_dict().items() if k not in ("model", "seed", "workdir")}
    plan = {"task": "lm", "data": cfg.data, "models": [a.to_dict() for a in arms], "matching": matching,
            "seeds": seed_list, "recipe": recipe, "steps": cfg.steps, "batch_size": cfg.batch_size,
            "tokens": matching["tokens"], "train_tokens": cfg.steps * cfg.batch_size * matching["tokens"],
            "threads": threads, "command": command or "softmoe.compare.lm.compare_lm(...)"}
    if not report_only:  # a report of the records so far may come from another --out or release
        check_plan(out_dir, {k: v for k, v in plan.items() if k != "command"})
    log(f"compare (lm): {len(arms)} arms x {len(seed_list)} seeds, {cfg.steps} steps of {cfg.batch_size}x"
        f"{matching['tokens']} tokens on {cfg.data!r}, one run at a time, {threads} thread(s); output {out_dir}")
    for a in arms:
        log(f"  {a.key:40s} {a.params:>9,} params  {matching['ratios'][a.key]:6.3f}x reference FLOPs  {a.description}")
    records = run_serial(runs, log, report_only=report_only)
    if not records:
        raise ValueError(f"--report-only: no run in {str(out_dir)!r} is complete yet")
    plan["missing_runs"] = [f"{r.key} seed {r.seed}" for r in runs
                            if not any(x["key"] == r.key and x["seed"] == r.seed for x in records)]
    plan["bootstrap"] = f"{BOOTSTRAP_REPLICATES} replicates, generator seed {BOOTSTRAP_SEED}"
    plan["claim_margin_bits"] = CLAIM_MARGIN_BITS
    measured = measure_speed_lm(arms, cfg.batch_size, threads, log) if speed else None
    report = build_report(plan, arms, records, measured)
    text = markdown(report)
    for folder in [out_dir] + ([Path(records_dir)] if records_dir else []):
        atomic_write_json(folder / REPORT_JSON, report, indent=1, sort_keys=True)
        atomic_write_text(folder / REPORT_MD, text)
    log(text)
    return report


def load_records(records_dir: str | Path) -> list[dict]:
    """Every <arm>/seed<k>.json record under `records_dir` (for a report on another machine)."""
    out = []
    for p in sorted(Path(records_dir).glob("*/seed*.json")):
        out.append(json.loads(p.read_text()))
    return out


__all__ = ["compare_lm", "build_arms", "forward_flops", "measure_speed_lm", "build_report", "markdown",
           "load_records", "DEFAULT_ARMS"]
