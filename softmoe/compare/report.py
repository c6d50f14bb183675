"""The comparison report: Markdown, JSON and PNG plots built from the run records.

Every number in it comes from the runs' own records (compare_run.json, metrics.jsonl); the
statistics follow softmoe.compare.stats (stated in the report itself)."""
from __future__ import annotations

import json
from pathlib import Path

from .stats import (BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, CI_LEVEL, CLAIM_MARGIN_EXAMPLES, SE_THRESHOLD, difference,
                    paired_bootstrap, summarize, unpack_correct)

REPORT_MD, REPORT_JSON = "report.md", "report.json"
PLOTS = ("accuracy_vs_flops.png", "accuracy_vs_wallclock.png", "learning_curves.png", "router_over_time.png")
ROUTER_METRICS = ("scale", "dispatch_entropy", "dispatch_max", "combine_entropy", "combine_max")


def build(plan: dict, records: list[dict], speed: dict) -> dict:
    """The report's data: per-model summaries, differences to dense, every run. `speed`:
    {model key: {"train_images_per_s", "infer_images_per_s"}} measured side by side
    (softmoe.compare.speed)."""
    specs = {s["key"]: s for s in plan["models"]}
    by_model: dict[str, list[dict]] = {k: [] for k in specs}
    for r in records:
        by_model[r["key"]].append(r)
    acc = {k: {r["seed"]: r["summary"]["test_accuracy"] for r in rs} for k, rs in by_model.items()}
    val = {k: {r["seed"]: r["summary"]["val_accuracy"] for r in rs if r["summary"].get("val_accuracy") is not None}
           for k, rs in by_model.items()}
    dense = acc.get("dense", {})
    models = []
    for key, spec in specs.items():
        rs = by_model[key]
        if not rs:
            continue
        s = summarize(list(acc[key].values()))
        losses = [r["summary"]["train_loss"] for r in rs if r["summary"]["train_loss"] is not None]
        loss = summarize(losses) if losses else None
        gap = summarize([r["train_accuracy"] - r["summary"]["test_accuracy"] for r in rs])
        row = {
            "key": key, "description": spec["description"], "model": spec["model"], "params": spec["params"],
            "flops": spec["flops"], "flops_vs_dense": spec["flops"] / plan["matching"]["dense_flops"],
            **speed[key],
            "test_accuracy": s.to_dict(), "train_loss": loss.to_dict() if loss else None,
            "train_test_gap": gap.to_dict(), "wall_s": _median([r["summary"]["wall_s"] for r in rs]),
            "routing": _mean_routing(rs), "router_over_time": router_over_time(rs),
        }
        if val[key]:
            row["val_accuracy"] = summarize(list(val[key].values())).to_dict()
        if key != "dense" and dense:
            row["vs_dense"] = compare_arms(by_model[key], by_model["dense"], "test", "dense")
            if val[key] and val["dense"]:
                row["vs_dense_val"] = compare_arms(by_model[key], by_model["dense"], "val", "dense")
        models.append(row)
    runs = [{"key": r["key"], "seed": r["seed"], "test_accuracy": r["summary"]["test_accuracy"],
             "val_accuracy": r["summary"].get("val_accuracy"),
             "train_accuracy": r["train_accuracy"], "train_loss": r["summary"]["train_loss"],
             "test_loss": r["summary"]["test_loss"], "wall_s": r["summary"]["wall_s"],
             "run_train_images_per_s": r["summary"]["images_per_s"],
             "workdir": r["summary"]["workdir"], "routing": r["routing"], "history": r.get("history", [])}
            for r in records]
    primary = "val_accuracy" if all("val_accuracy" in m for m in models) and models else "test_accuracy"
    ranking = sorted(models, key=lambda m: -m[primary]["mean"])
    present = [k for k in specs if by_model[k]]
    pairwise = []
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            pair = {"model": a, "reference": b,
                    "test": compare_arms(by_model[a], by_model[b], "test", b)}
            if val[a] and val[b]:
                pair["val"] = compare_arms(by_model[a], by_model[b], "val", b)
            pairwise.append(pair)
    return {"plan": plan, "models": models, "runs": runs, "ranking": [m["key"] for m in ranking],
            "ranking_by": primary, "pairwise": pairwise, "statistics": STATS_RULE}


STATS_RULE = (f"mean ± sample std over seeds; Δ = mean-over-seeds accuracy difference, with a {CI_LEVEL:.0%} paired "
              f"bootstrap CI over test examples (the same examples for both models) and seeds ({BOOTSTRAP_REPLICATES} "
              f"replicates, fixed seed {BOOTSTRAP_SEED}); a difference is claimed only when the CI excludes 0 by "
              f"{CLAIM_MARGIN_EXAMPLES} examples' worth. Runs recorded without per-example correctness fall back to "
              f"the seed-only rule (Welch SE, |Δ| > {SE_THRESHOLD:g} SE and every shared seed agreeing)")


def compare_arms(runs: list[dict], reference: list[dict], split: str, name: str) -> dict:
    """`runs` against `reference` (run records) on `split`: the paired bootstrap when every run
    saved its per-example correctness, else the seed-only rule (marked "seed_only")."""
    key = f"{split}_accuracy"
    if all(split in r.get("correct", {}) for r in runs + reference):
        def vectors(rs):
            return {r["seed"]: unpack_correct(r["correct"][split], r["examples"][split]) for r in rs}

        d = paired_bootstrap(vectors(runs), vectors(reference))
        return {**d.to_dict(), "words": d.words(name), "method": "paired_bootstrap"}
    d = difference({r["seed"]: r["summary"][key] for r in runs}, {r["seed"]: r["summary"][key] for r in reference})
    return {**d.to_dict(), "words": d.words(name) + " [seed noise only]", "method": "seed_only"}


def router_over_time(records: list[dict]) -> list[dict]:
    """[{"step", metric: mean over MoE layers and seeds}] from the runs' evaluation histories."""
    by_step: dict[int, dict[str, list[float]]] = {}
    for r in records:
        for h in r.get("history", []):
            for k, v in h.items():
                if k.startswith("router/") and k.rsplit("/", 1)[1] in ROUTER_METRICS:
                    by_step.setdefault(h["step"], {}).setdefault(k.rsplit("/", 1)[1], []).append(v)
    return [{"step": s, **{m: sum(v) / len(v) for m, v in d.items()}} for s, d in sorted(by_step.items())]


def _median(values):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def _mean_routing(records: list[dict]) -> dict:
    """Each routing diagnostic averaged over layers and runs."""
    sums: dict[str, list[float]] = {}
    for r in records:
        for layer in r["routing"].values():
            for k, v in layer.items():
                sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _pm(s: dict | None, scale: float = 100.0, digits: int = 2) -> str:
    if s is None:
        return "-"
    if s["std"] is None:
        return f"{scale * s['mean']:.{digits}f} (n=1)"
    return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f} (n={s['n']})"


def markdown(report: dict) -> str:
    from softmoe._tables import markdown_table

    plan = report["plan"]
    m = plan["matching"]
    seeds = (f"- Seeds per arm: {', '.join(f'{k} {v}' for k, v in plan['arm_seeds'].items())}"
             if plan.get("arm_seeds") else f"- Seeds: {plan['seeds']}" + (
                 f" (ablations and controls: {plan['ablation_seeds']})"
                 if plan.get("ablation_seeds", plan["seeds"]) != plan["seeds"] else ""))
    lines = [f"# softmoe compare: {plan['data']}, base {m['base']}", "",
             f"Command: `{plan['command']}`", "",
             f"- Recipe (the same for every model): {_recipe_words(plan)}",
             f"- Cost matching: {m['matching']}; {m['tokens']} tokens per image; Tokens/Experts Choice route "
             f"groups of {m['group_size']} image(s).",
             seeds + f". Statistics: {report['statistics']}.",
             *([f"- **Incomplete**: missing runs {', '.join(plan['missing_runs'])} (report written with "
                f"--report-only)."] if plan.get("missing_runs") else []),
             "- Throughput (train: forward + backward + AdamW step; inference: forward): every model timed "
             f"side by side in one process after the runs, round-robin, {plan['threads']} thread(s), a batch "
             "of the recipe's size, medians of 5 rounds. The runs' own images/s (in report.json) are not "
             "comparable: they ran in parallel on a machine whose load changed.", ""]
    rows = []
    has_val = any("val_accuracy" in x for x in report["models"])
    for x in report["models"]:
        vs = x.get("vs_dense")
        rows.append({"model": x["key"], "params": f"{x['params'] / 1e6:.2f}M", "GFLOP/img": f"{x['flops'] / 1e9:.4f}",
                     "FLOPs vs dense": f"{x['flops_vs_dense']:.3f}",
                     "train img/s": _fmt(x["train_images_per_s"]), "infer img/s": _fmt(x["infer_images_per_s"]),
                     **({"val top-1 %": _pm(x.get("val_accuracy"))} if has_val else {}),
                     **({"val Δ vs dense (pp)": _delta(x.get("vs_dense_val"))} if has_val else {}),
                     "test top-1 %": _pm(x["test_accuracy"]),
                     "test Δ vs dense (pp)": _delta(vs),
                     "test verdict": "baseline" if x["key"] == "dense" else vs["verdict"],
                     "final train loss": _pm(x["train_loss"], 1.0, 4),
                     "train−test gap (pp)": _pm(x["train_test_gap"])})
    cols = list(rows[0]) if rows else []
    lines += ["## Results", "", markdown_table(cols, rows), ""]
    lines += ["In words (test set, scored once at the end):", ""] + [
        f"- **{x['key']}** ({x['description']}): {x['vs_dense']['words']}"
        for x in report["models"] if "vs_dense" in x] + [""]
    if has_val:
        lines += ["On the validation split (held out of train; what design decisions read):", ""] + [
            f"- **{x['key']}**: {x['vs_dense_val']['words']}" for x in report["models"] if "vs_dense_val" in x] + [""]
    by = "validation" if report.get("ranking_by") == "val_accuracy" else "test"
    lines += [f"Ranking by mean {by} top-1: {' > '.join(report['ranking'])}.", ""]
    pairs = [p for p in report.get("pairwise", []) if p["reference"] != "dense" and p["model"] != "dense"]
    if pairs:
        prow = [{"model": p["model"], "vs": p["reference"],
                 **({"val Δ (pp)": _delta(p.get("val")), "val verdict": p["val"]["verdict"] if "val" in p else "-"}
                    if has_val else {}),
                 "test Δ (pp)": _delta(p["test"]), "test verdict": p["test"]["verdict"]} for p in pairs]
        lines += ["## Every arm against every other", "", markdown_table(list(prow[0]), prow), ""]
    diag = [x for x in report["models"] if x["routing"]]
    if diag:
        keys = sorted({k for x in diag for k in x["routing"]})
        drows = [{"model": x["key"], **{k: (f"{x['routing'][k]:.3f}" if k in x["routing"] else "-") for k in keys}}
                 for x in diag]
        lines += ["## Routing diagnostics (final models, first test images, mean over MoE layers and seeds)", "",
                  "dispatch/combine entropy: normalised to 1 = uniform; dropped: fraction never processed by an "
                  "expert.", "", markdown_table(["model"] + keys, drows), ""]
    over = [x for x in report["models"] if x.get("router_over_time")]
    if over:
        orows = []
        for x in over:
            first, last = x["router_over_time"][0], x["router_over_time"][-1]
            orows.append({"model": x["key"], **{
                m: f"{first[m]:.3f} → {last[m]:.3f}" for m in ROUTER_METRICS if m in first and m in last},
                "steps": f"{first['step']} → {last['step']}"})
        cols = ["model"] + [m for m in ROUTER_METRICS if any(m in r for r in orows)] + ["steps"]
        lines += ["## Routing over training (first → last evaluation; mean over MoE layers and seeds)", "",
                  markdown_table(cols, [{c: r.get(c, "-") for c in cols} for r in orows]), "",
                  "Every evaluation is plotted in router_over_time.png.", ""]
    rrows = [{"model": r["key"], "seed": r["seed"], "test top-1 %": f"{100 * r['test_accuracy']:.2f}",
              "train top-1 %": f"{100 * r['train_accuracy']:.2f}", "final train loss": _fmt(r["train_loss"], ".4f"),
              "wall s": _fmt(r["wall_s"]), "workdir": r["workdir"]} for r in report["runs"]]
    lines += ["## Every run", "", markdown_table(list(rrows[0]) if rrows else [], rrows), ""]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report.get("plots", [])] + [""]
    return "\n".join(lines)


def _delta(d: dict | None) -> str:
    """"+1.23 [+0.40, +2.05] (n=10000, ±0.60)" for a bootstrap difference, "+1.23 ± 0.40" (SE) seed-only."""
    if not d:
        return "-"
    if d.get("method") == "paired_bootstrap":
        lo, hi = d["ci"]
        return f"{100 * d['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] (n={d['n_examples']}, " \
               f"±{100 * d['resolvable']:.2f})"
    return f"{100 * d['diff']:+.2f}" + (f" ± {100 * d['se']:.2f} SE" if d.get("se") is not None else "")


def _recipe_words(plan: dict) -> str:
    """The recipe's fields that differ from TrainConfig's defaults, plus its length."""
    from softmoe.train import TrainConfig

    default = TrainConfig().to_dict()
    r = plan["recipe"]
    diff = [f"{k}={r[k]}" for k in sorted(r) if k in default and r[k] != default[k]
            and k not in ("steps", "epochs", "data", "data_root", "plots", "tensorboard", "keep_checkpoints",
                          "checkpoint_every")]
    length = f"{plan['steps']} steps of {r['batch_size']} images"
    return f"{length}; TrainConfig defaults except {', '.join(diff)}" if diff else f"{length}; TrainConfig defaults"


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def write(out_dir: Path, plan: dict, records: list[dict], speed: dict) -> dict:
    """Write report.md, report.json and the plots into out_dir; return the report dict."""
    from softmoe._io import atomic_write_json, atomic_write_text

    report = build(plan, records, speed)
    report["plots"] = write_plots(out_dir, report)
    atomic_write_json(out_dir / REPORT_JSON, report, sort_keys=True)
    atomic_write_text(out_dir / REPORT_MD, markdown(report))
    return report


def write_plots(out_dir: Path, report: dict) -> list[str]:
    """Accuracy against training FLOPs and against wall-clock (every run, mean per model) and
    learning curves (train loss, test accuracy at each evaluation), as PNGs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from softmoe._io import atomic_write
    from softmoe.train.logs import read_metrics

    plan = report["plan"]
    flops = {x["key"]: x["flops"] for x in report["models"]}
    palette = [plt.cm.tab10(i) for i in range(10)] + ["black", "gold", "navy", "lime"]
    colors = {k: palette[i % len(palette)] for i, k in enumerate(flops)}
    written = []

    def save(fig, name):
        atomic_write(out_dir / name, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        plt.close(fig)
        written.append(name)

    images_seen = plan["train_images"]  # per run: steps * batch size
    for name, xkey, xlabel in (("accuracy_vs_flops.png", "flops", "training FLOPs (3 x forward x images seen)"),
                               ("accuracy_vs_wallclock.png", "wall_s", "training wall-clock (s)")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for x in report["models"]:
            k = x["key"]
            runs = [r for r in report["runs"] if r["key"] == k]
            xs = [3 * flops[k] * images_seen if xkey == "flops" else r["wall_s"] for r in runs]
            ax.scatter(xs, [100 * r["test_accuracy"] for r in runs], color=colors[k], alpha=0.4, s=14)
            ax.scatter([sum(xs) / len(xs)], [100 * x["test_accuracy"]["mean"]], color=colors[k], s=60,
                       edgecolor="black", label=k)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        save(fig, name)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in report["runs"]:
        recs = read_metrics(r["workdir"])
        tr = [(m["step"], m["loss"]) for m in recs if m.get("kind") == "train"]
        if not any(m.get("kind") == "eval" for m in recs):  # the work directory is elsewhere: the record's history
            recs = [{"kind": "eval", **h} for h in r.get("history") or []]
        acc_key = "val_accuracy" if any("val_accuracy" in m for m in recs) else "test_accuracy"
        ev = [(m["step"], 100 * m[acc_key]) for m in recs if m.get("kind") == "eval" and acc_key in m]
        label = r["key"] if r["seed"] == plan["seeds"][0] else None
        if tr:
            a1.plot(*zip(*tr), color=colors[r["key"]], alpha=0.6, lw=1, label=label)
        if ev:
            a2.plot(*zip(*ev), color=colors[r["key"]], alpha=0.6, lw=1, marker=".", label=label)
    a1.set(xlabel="step", ylabel="train loss (log-window mean)", yscale="log")
    a2.set(xlabel="step", ylabel=f"{'validation' if report.get('ranking_by') == 'val_accuracy' else 'test'} top-1 (%)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7, ncol=2)
    save(fig, "learning_curves.png")

    over = [x for x in report["models"] if x.get("router_over_time")]
    if over:
        metrics = [m for m in ROUTER_METRICS if any(m in h for x in over for h in x["router_over_time"])]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5), squeeze=False)
        for ax, m in zip(axes[0], metrics):
            for x in over:
                pts = [(h["step"], h[m]) for h in x["router_over_time"] if m in h]
                if pts:
                    ax.plot(*zip(*pts), color=colors[x["key"]], marker=".", lw=1, label=x["key"])
            ax.set(xlabel="step", title=m)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        save(fig, "router_over_time.png")
    return written


def load(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / REPORT_JSON).read_text())
