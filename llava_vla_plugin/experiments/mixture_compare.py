"""Mixtures side by side at a matched budget: per-dataset held-out numbers and closed-loop success, one table
and one figure (issue 24 item 4).

    python -m llava_vla_plugin.experiments.mixture_compare RUNS [RUNS ...] --out reports/mixtures [--by mixture]
    python -m llava_vla_plugin.experiments.mixture_compare RUNS --spec STUDY.yaml --launch --out reports/mixtures [--dry-run]

The study itself is a sweep (llava_vla_plugin/experiments/sweep.py), so defining, dry-running, launching and
resuming after a kill are the sweep's: a spec with `grid.mixture: [...]` (files, presets or rules), one
`steps:` value (the matched budget: every run takes the same number of optimizer steps of the same batch),
`grid.train_seed: [0, 1, 2]` for repeats, and optionally `closed_loop:` (vla-eval benchmarks each finished run
is served for: experiments/closed_loop_study.py). `--spec STUDY.yaml --launch` is the whole study in one
command: `sweep STUDY.yaml --out RUNS --launch` (train the unfinished runs, then evaluate closed loop every
finished run without <run>/closed_loop/report.json), then this report; rerun after a kill, it resumes at every
step. With --dry-run it prints what would run (training, the closed-loop servers and vla-eval commands) and
writes nothing. This command reads what the runs wrote:

  * out/final_metrics.json: the per-dataset validation numbers every run logs (val_<dataset>_*: constrained
    teacher-forced action accuracy, L1, action tokens; train/trainer.py METRIC_DOC). The validation set is the
    sweep's one shared file, so every run is scored on the same samples;
  * <run>/closed_loop/report.json where closed_loop_report wrote one (`--out <run>/closed_loop`): successes and
    trials per suite.

Runs are grouped into comparison sets by everything but the compared axis (`--by`, default mixture) and the
training seed: runs with a different fraction, model, steps or action representation are never pooled. Within
a set, each value of the axis gets, per dataset:
  accuracy     the mean over its seeds of the constrained accuracy, with a Wilson 95 % interval over the pooled
               action tokens (correct and total summed over seeds). Tokens of one frame are not independent, so
               the interval is a lower bound on the uncertainty; the spread over seeds (min-max) is shown beside it.
  L1           the mean over seeds (normalized units).
  success      closed-loop successes / trials pooled over seeds, Wilson 95 % (closed_loop_report.wilson_interval),
               with the published anchors of configs/closed_loop/published.yaml beside it (published, not re-run).
OUT gets mixture_compare.json (everything), mixture_compare.md (the tables), mixture_compare.csv (one row per
set x value x dataset) and mixture_compare.png (accuracy per dataset with intervals; success per suite).
Exit codes: 0 written, 2 bad input (no runs, or no finished run with per-dataset validation); with --launch, 1 when
a run's training or closed-loop evaluation failed (the report of the others is written).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from data_tools.cli import add_common_flags, add_output, setup_logging
from llava_vla_plugin.experiments.closed_loop_report import PUBLISHED, load_published, wilson_interval
from llava_vla_plugin.experiments.scaling import _read_json, _run_dirs

SET_KEYS = ("fraction", "model", "steps", "action_repr")  # never pooled: a different budget or setting
_TOKENS = re.compile(r"^val_(.+)_action_tokens$")
ACC = "action_accuracy_teacher_forced_constrained"


class CompareError(ValueError):
    """Runs that cannot be compared; the message says what to fix."""


def per_dataset(metrics: dict) -> dict[str, dict[str, float]]:
    """{dataset: {accuracy, l1, tokens}} from a final_metrics.json's val_<dataset>_* keys (trainer.validation_metrics)."""
    out = {}
    for key, tokens in metrics.items():
        m = _TOKENS.match(key)
        if not m or m.group(1) == "":
            continue
        name = m.group(1)
        acc, l1 = metrics.get(f"val_{name}_{ACC}"), metrics.get(f"val_{name}_action_l1")
        if acc is None or not isinstance(tokens, (int, float)):
            continue
        out[name] = {"accuracy": float(acc), "l1": None if l1 is None else float(l1), "tokens": int(tokens)}
    return out


def collect(paths: Sequence[str | Path], by: str) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished run with per-dataset validation; also the runs skipped and why."""
    from llava_vla_plugin.experiments.closed_loop_report import REPORT_DIR

    rows, skipped = [], []
    dirs = _run_dirs(paths)
    if not dirs:
        raise CompareError(f"no run folders under {', '.join(map(str, paths))} (a sweep's RUNS folder holds them)")
    for d in dirs:
        config = _read_json(d / "config.json") or {}
        out = d / "out" if (d / "out").is_dir() else d
        final = _read_json(out / "final_metrics.json")
        name = config.get("run") or d.name
        if final is None:
            skipped.append(f"{name}: no final_metrics.json (unfinished? relaunch the sweep: it resumes)")
            continue
        datasets = per_dataset(final)
        if not datasets:
            skipped.append(f"{name}: no per-dataset validation in final_metrics.json (was VAL_DATA set?)")
            continue
        if by not in config:
            raise CompareError(f"{d / 'config.json'} has no {by!r}: --by names a sweep axis (mixture, fraction, model, "
                               "steps, action_repr)")
        closed = {}
        for where in (d / REPORT_DIR, d / "out" / REPORT_DIR):
            report = _read_json(where / "report.json")
            if report:
                closed = {s: {"successes": int(r["successes"]), "trials": int(r["trials"])}
                          for s, r in (report.get("suites") or {}).items()}
                break
        rows.append({"run": name, "value": str(config[by]), "seed": config.get("train_seed"),
                     "set": {k: config.get(k) for k in SET_KEYS if k != by}, "datasets": datasets, "closed_loop": closed})
    return rows, skipped


def summarize(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """Comparison sets: each value of `by` with per-dataset pooled numbers (module docstring)."""
    sets: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        sets[json.dumps(r["set"], sort_keys=True)].append(r)
    out = []
    for key, members in sorted(sets.items()):
        values: dict[str, list[dict]] = defaultdict(list)
        for r in members:
            values[r["value"]].append(r)
        entries = []
        for value, runs in sorted(values.items()):
            seeds = [r["seed"] for r in runs]
            if len(seeds) != len(set(map(str, seeds))):
                raise CompareError(f"{by}={value}: runs {[r['run'] for r in runs]} share a training seed: they are the "
                                   "same run twice (two sweeps over one RUNS?)")
            datasets = {}
            for ds in sorted({d for r in runs for d in r["datasets"]}):
                have = [r["datasets"][ds] for r in runs if ds in r["datasets"]]
                correct = sum(round(h["accuracy"] * h["tokens"]) for h in have)
                total = sum(h["tokens"] for h in have)
                lo, hi = wilson_interval(correct, total)
                accs = [h["accuracy"] for h in have]
                l1s = [h["l1"] for h in have if h["l1"] is not None]
                datasets[ds] = {"accuracy": sum(accs) / len(accs), "wilson95": [lo, hi], "seed_range": [min(accs), max(accs)],
                                "per_seed": accs,
                                "tokens": total, "runs": len(have), "l1": sum(l1s) / len(l1s) if l1s else None}
            suites = {}
            for s in sorted({s for r in runs for s in r["closed_loop"]}):
                succ = sum(r["closed_loop"][s]["successes"] for r in runs if s in r["closed_loop"])
                trials = sum(r["closed_loop"][s]["trials"] for r in runs if s in r["closed_loop"])
                lo, hi = wilson_interval(succ, trials)
                suites[s] = {"successes": succ, "trials": trials, "success": succ / trials if trials else None,
                             "wilson95": [lo, hi]}
            entries.append({by: value, "seeds": seeds, "runs": [r["run"] for r in runs], "datasets": datasets,
                            "closed_loop": suites})
        out.append({"set": json.loads(key), "entries": entries})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render(sets: list[dict[str, Any]], by: str, published: dict[str, Any]) -> str:
    lines = [f"# Mixture comparison by {by}", "",
             "Accuracy: constrained teacher-forced action accuracy on the shared validation set, mean over training "
             "seeds; Wilson 95 % over the pooled action tokens (a lower bound on the uncertainty: tokens of one "
             "frame are not independent) and the seeds' range. Closed loop: successes / trials pooled over seeds, "
             "Wilson 95 %. Published numbers are published, not re-run.", ""]
    for s in sets:
        where = ", ".join(f"{k}={v}" for k, v in s["set"].items() if v is not None) or "all runs"
        datasets = sorted({d for e in s["entries"] for d in e["datasets"]})
        lines += [f"## {where}", "", f"| {by} | seeds | " + " | ".join(f"{d} acc % (Wilson 95 %; seeds)" for d in datasets)
                  + " | " + " | ".join(f"{d} L1" for d in datasets) + " |",
                  "|---|---|" + "---|" * (2 * len(datasets))]
        for e in s["entries"]:
            cells = []
            for d in datasets:
                x = e["datasets"].get(d)
                cells.append("-" if x is None else f"{_pct(x['accuracy'])} ({_pct(x['wilson95'][0])}-{_pct(x['wilson95'][1])}; "
                                                   f"{_pct(x['seed_range'][0])}-{_pct(x['seed_range'][1])})")
            l1 = [("-" if e["datasets"].get(d, {}).get("l1") is None else f"{e['datasets'][d]['l1']:.4f}") for d in datasets]
            lines.append(f"| {e[by]} | {len(e['seeds'])} | " + " | ".join(cells) + " | " + " | ".join(l1) + " |")
        suites = sorted({x for e in s["entries"] for x in e["closed_loop"]})
        if suites:
            lines += ["", f"| {by} | " + " | ".join(f"{x} success % (Wilson 95 %)" for x in suites) + " |",
                      "|---|" + "---|" * len(suites)]
            for e in s["entries"]:
                cells = []
                for x in suites:
                    c = e["closed_loop"].get(x)
                    cells.append("-" if c is None else f"{_pct(c['success'])} ({c['successes']}/{c['trials']}; "
                                                       f"{_pct(c['wilson95'][0])}-{_pct(c['wilson95'][1])})")
                lines.append(f"| {e[by]} | " + " | ".join(cells) + " |")
            for m in published.get("models", []):
                vals = [m.get("success", {}).get(x) for x in suites]
                if any(v is not None for v in vals):
                    lines.append(f"| {m['model']} (published, not re-run) | " +
                                 " | ".join("-" if v is None else f"{v:.1f}" for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(sets: list[dict[str, Any]], by: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(s, "acc") for s in sets] + [(s, "cl") for s in sets if any(e["closed_loop"] for e in s["entries"])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for ax, (s, kind) in zip(axes[:, 0], panels):
        groups = sorted({d for e in s["entries"] for d in (e["datasets"] if kind == "acc" else e["closed_loop"])})
        width = 0.8 / max(len(s["entries"]), 1)
        for i, e in enumerate(s["entries"]):
            src = e["datasets"] if kind == "acc" else e["closed_loop"]
            ys = np.array([np.nan if g not in src else (src[g]["accuracy"] if kind == "acc" else src[g]["success"] or 0.0)
                           for g in groups])
            lo = np.array([np.nan if g not in src else src[g]["wilson95"][0] for g in groups])
            hi = np.array([np.nan if g not in src else src[g]["wilson95"][1] for g in groups])
            xs = np.arange(len(groups)) + (i - (len(s["entries"]) - 1) / 2) * width
            ax.bar(xs, ys, width=width, label=f"{by}={e[by]} ({len(e['seeds'])} seed(s))")
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], fmt="none", ecolor="k", capsize=3, linewidth=1)
            if kind == "acc":  # each seed's own number: the spread the pooled interval does not show
                for x, g in zip(xs, groups):
                    if g in src:
                        ax.scatter([x] * len(src[g]["per_seed"]), src[g]["per_seed"], s=10, color="k", zorder=3)
        ax.set_xticks(np.arange(len(groups)))
        ax.set_xticklabels(groups, rotation=15, fontsize=8)
        ax.set_ylim(0, 1.05)
        where = ", ".join(f"{k}={v}" for k, v in s["set"].items() if v is not None)
        ax.set_title(("held-out constrained action accuracy per dataset (bars: mean over seeds, whiskers: Wilson 95 % "
                      "over pooled tokens, dots: each seed)" if kind == "acc" else
                      "closed-loop success per suite (pooled over seeds, Wilson 95 %)") + f"\n{where}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.experiments.mixture_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="a sweep's RUNS folder(s), or run folders")
    p.add_argument("--by", default="mixture", help="the compared sweep axis (default mixture; also fraction, model, "
                                                   "steps, action_repr)")
    p.add_argument("--published", type=Path, default=PUBLISHED, help="closed-loop anchors (configs/closed_loop/published.yaml)")
    p.add_argument("--spec", type=Path, default=None, metavar="STUDY.yaml",
                   help="the study's sweep spec: with --launch, train and evaluate it into RUNS first")
    p.add_argument("--launch", action="store_true", help="with --spec: `sweep SPEC --out RUNS --launch` (training, then "
                   "the closed loop where the spec configures it; resumable), then the report")
    p.add_argument("--dry-run", action="store_true", help="with --launch: print what would run; run and write nothing")
    add_output(p, help="output folder (default reports/mixture_compare)", required=False,
               default=Path("reports/mixture_compare"))
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    launched = 0
    if args.launch or args.spec is not None or args.dry_run:
        if not (args.launch and args.spec is not None):
            parser.error("--spec, --launch and --dry-run go together: RUNS --spec STUDY.yaml --launch [--dry-run]")
        if len(args.runs) != 1:
            parser.error("with --launch give one RUNS folder: the sweep's --out")
        from llava_vla_plugin.experiments.sweep import main as sweep_main

        launched = sweep_main([str(args.spec), "--out", str(args.runs[0]), "--launch", *(["--dry-run"] if args.dry_run else []),
                               *(["--no-progress"] if args.no_progress else [])])
        if launched == 2:  # the spec was refused (the sweep said why)
            return 2
        if args.dry_run:
            print(f"[dry-run] would write the report: {Path(args.out) / 'mixture_compare.md'} (.json, .csv, .png), "
                  f"by {args.by}", file=sys.stderr)
            return 0
    try:
        rows, skipped = collect(args.runs, args.by)
        for s in skipped:
            print(f"skipped {s}", file=sys.stderr)
        if not rows:
            raise CompareError("no finished run with per-dataset validation to compare")
        sets = summarize(rows, args.by)
        published = load_published(args.published)
    except (CompareError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render(sets, args.by, published)
    (out / "mixture_compare.md").write_text(md)
    (out / "mixture_compare.json").write_text(json.dumps({"by": args.by, "sets": sets, "skipped": skipped}, indent=2))
    with open(out / "mixture_compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", args.by, "dataset", "seeds", "accuracy", "wilson95_low", "wilson95_high", "seed_min", "seed_max",
                    "tokens", "l1"])
        for s in sets:
            where = ";".join(f"{k}={v}" for k, v in s["set"].items())
            for e in s["entries"]:
                for d, x in e["datasets"].items():
                    w.writerow([where, e[args.by], d, len(e["seeds"]), x["accuracy"], *x["wilson95"], *x["seed_range"],
                                x["tokens"], x["l1"]])
    plot(sets, args.by, out / "mixture_compare.png")
    print(md)
    print(f"wrote {out / 'mixture_compare.md'}, .json, .csv and .png")
    if launched:
        print(f"[study] a run's training or closed-loop evaluation failed (above); the report has the others. Rerun the "
              "same command to resume.", file=sys.stderr)
    return 1 if launched else 0


if __name__ == "__main__":
    sys.exit(main())
