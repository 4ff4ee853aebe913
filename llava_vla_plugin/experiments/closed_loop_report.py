"""Closed-loop success per suite, beside the published anchors (which are NOT re-run here).

    python -m llava_vla_plugin.experiments.closed_loop_report results/libero_spatial results/libero_object ... \\
        --out reports/libero --train-seed 42 --label "ov-vla 0.5B, libero_4_suites"

Reads vla-eval's result files (`<benchmark>_aggregate.json`, searched under each RESULTS_DIR), counts
successes per suite (an episode that errored counts as a failure, and the count of errors is shown),
and writes report.md + report.json with: successes/trials, a Wilson 95 % interval (the interval that
stays inside [0, 1] and is honest at 50 trials per task), trials per task, the training seed, and the
published numbers of configs/closed_loop/published.yaml with the inputs each had.

Suites are matched by the benchmark's `name` in the run config: `libero_spatial`, ... exactly, and
SimplerEnv's per-task names (`simpler_google_robot_pick_coke_can`) by prefix.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "configs" / "closed_loop" / "published.yaml"
DEFAULT_INPUTS = "third-person image only; no wrist camera, no proprio"  # what vla_eval_server sends the model
Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927); (0, 1) when there are no trials."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} not in [0, {trials}]")
    p, z2 = successes / trials, z * z
    denom = 1.0 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class SuiteResult:
    suite: str
    successes: int = 0
    trials: int = 0
    errors: int = 0
    trials_per_task: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")

    def summary(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.successes, self.trials)
        per_task = sorted(set(self.trials_per_task.values()))
        return {**asdict(self), "success_pct": round(100 * self.rate, 2) if self.trials else None,
                "wilson95_pct": [round(100 * lo, 2), round(100 * hi, 2)], "tasks": len(self.trials_per_task),
                "trials_per_task_range": [per_task[0], per_task[-1]] if per_task else []}


def load_published(path: Path = PUBLISHED) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not {"suites", "models"} <= set(doc):
        raise ValueError(f"{path}: expected `suites:` and `models:` (see the file's header)")
    return doc


def suite_of(name: str, suites: Iterable[str]) -> str | None:
    """The suite a benchmark run belongs to: exact name, else the longest suite that prefixes `name_`."""
    suites = list(suites)
    if name in suites:
        return name
    matches = [s for s in suites if name.startswith(s + "_")]
    return max(matches, key=len) if matches else None


def collect(result_dirs: Iterable[Path], suites: Iterable[str]) -> tuple[dict[str, SuiteResult], list[str]]:
    """Suite -> counts from every *_aggregate.json under the directories; also the files that matched no suite."""
    out: dict[str, SuiteResult] = {}
    unmatched: list[str] = []
    suites = list(suites)
    for d in result_dirs:
        files = [d] if d.is_file() else sorted(d.rglob("*_aggregate.json"))
        if not files:
            raise FileNotFoundError(f"{d}: no vla-eval *_aggregate.json here (did `vla-eval run` finish? "
                                    "its --output-dir is where they are written)")
        for f in files:
            try:
                agg = json.loads(f.read_text())
                name = (agg.get("config") or {}).get("name") or agg["benchmark"]
                tasks = agg["tasks"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{f}: not a vla-eval aggregate file ({type(e).__name__}: {e})") from None
            suite = suite_of(name, suites)
            if suite is None:
                unmatched.append(f"{f} ({name})")
                continue
            res = out.setdefault(suite, SuiteResult(suite))
            res.files.append(str(f))
            for task in tasks:
                eps = task.get("episodes", [])
                key = f"{name}/{task.get('task')}"
                res.trials_per_task[key] = res.trials_per_task.get(key, 0) + len(eps)
                res.trials += len(eps)
                res.successes += sum(bool((e.get("metrics") or {}).get("success")) for e in eps)
                res.errors += sum(1 for e in eps if e.get("failure_reason"))  # vla-eval's own rule (collector.py)
    return out, unmatched


REPORT_DIR = "closed_loop"  # a run's closed-loop report: <run>/closed_loop/report.json (--out <run>/closed_loop)


def closed_loop_metrics(run_dir: Path) -> dict[str, float]:
    """A run's closed-loop success as scaling.py's y values (fractions in [0, 1]), from <run_dir>/closed_loop/report.json:
    `closed_loop_<suite>` per suite, `closed_loop_<average>` (e.g. closed_loop_LIBERO) per complete average, and
    `closed_loop_success`: the average when there is exactly one, else the single suite, else absent."""
    data = None
    for d in (run_dir / REPORT_DIR, run_dir / "out" / REPORT_DIR):
        try:
            data = json.loads((d / "report.json").read_text())
            break
        except (OSError, ValueError):
            continue
    if not isinstance(data, dict):
        return {}
    out = {f"closed_loop_{s}": r["success_pct"] / 100 for s, r in (data.get("suites") or {}).items()
           if r.get("success_pct") is not None}
    averages = {f"closed_loop_{a}": v["success_pct"] / 100 for a, v in (data.get("averages") or {}).items()}
    out.update(averages)
    if len(averages) == 1:
        out["closed_loop_success"] = next(iter(averages.values()))
    elif not averages and len(out) == 1:
        out["closed_loop_success"] = next(iter(out.values()))
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def checkpoint_actions(checkpoint: Path) -> str:
    """The checkpoint's action representation in one line (core/representations' describe()), from its files."""
    from llava_vla_plugin.core.representations import ActionReprConfig, make_representation

    if not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"{checkpoint} is not a folder")
    return make_representation(ActionReprConfig.load(checkpoint), directory=checkpoint).describe()


def render(results: dict[str, SuiteResult], published: dict[str, Any], label: str, train_seed: int | None,
           inputs: str, actions: str = "not given (--checkpoint)") -> tuple[str, dict[str, Any]]:
    suites_meta = published["suites"]
    order = [s for s in suites_meta if s in results] + sorted(set(results) - set(suites_meta))
    summaries = {s: results[s].summary() for s in order}
    averages = {}
    for avg, members in (published.get("averages") or {}).items():
        if all(m in results for m in members):  # the field's average: equal weight per suite, all present
            rates = [results[m].rate for m in members]
            pooled = SuiteResult(avg, sum(results[m].successes for m in members), sum(results[m].trials for m in members))
            lo, hi = wilson_interval(pooled.successes, pooled.trials)
            averages[avg] = {"success_pct": round(100 * sum(rates) / len(rates), 2), "members": members,
                             "pooled_wilson95_pct": [round(100 * lo, 2), round(100 * hi, 2)]}
    seed = "not given (--train-seed)" if train_seed is None else str(train_seed)
    lines = [f"# Closed-loop success: {label}", "",
             f"Training seed: {seed}. Our inputs: {inputs}. Our actions: {actions}.",
             "Published numbers are **published, not re-run** (each from its authors' protocol).", "",
             "## Ours", "",
             "| suite | success % | successes / trials | Wilson 95 % | tasks | trials per task | errored episodes | actions |",
             "|---|---|---|---|---|---|---|---|"]
    for s in order:
        r = summaries[s]
        tpt = r["trials_per_task_range"]
        tpt_s = "-" if not tpt else (str(tpt[0]) if tpt[0] == tpt[1] else f"{tpt[0]}-{tpt[1]}")
        lines.append(f"| {suites_meta.get(s, {}).get('label', s)} | {_pct(r['success_pct'])} | {r['successes']} / "
                     f"{r['trials']} | {r['wilson95_pct'][0]:.1f}-{r['wilson95_pct'][1]:.1f} | {r['tasks']} | {tpt_s} | "
                     f"{r['errors']} | {actions} |")
    for avg, a in averages.items():
        lines.append(f"| **{avg} average** | {a['success_pct']:.1f} | (equal weight per suite) | "
                     f"{a['pooled_wilson95_pct'][0]:.1f}-{a['pooled_wilson95_pct'][1]:.1f} (pooled) | | | | {actions} |")
    cols = order + list(averages)
    lines += ["", "## Beside the published anchors (published, not re-run)", "",
              "| model | " + " | ".join(suites_meta.get(c, {}).get("label", c) for c in cols) + " | trials per task | inputs | actions |",
              "|---|" + "---|" * len(cols) + "---|---|---|"]
    ours = [_pct(summaries[c]["success_pct"]) if c in summaries else _pct(averages[c]["success_pct"]) for c in cols]
    lines.append(f"| **ours: {label}** | " + " | ".join(ours) + f" | {_ours_tpt(summaries)} | {inputs} | {actions} |")
    rows = []
    for m in published["models"]:
        vals = [m["success"].get(c) for c in cols]
        if all(v is None for v in vals):
            continue
        rows.append({"model": m["model"], **{c: v for c, v in zip(cols, vals)}, "trials_per_task": m.get("trials_per_task"),
                     "inputs": m.get("inputs"), "actions": m.get("actions"), "source": m.get("source"),
                     "published_not_rerun": True})
        lines.append(f"| {m['model']} (published, not re-run) | " + " | ".join(_pct(v) for v in vals) +
                     f" | {m.get('trials_per_task') or 'not stated'} | {m.get('inputs', '')} | "
                     f"{m.get('actions') or 'not recorded'} |")
    for r in summaries.values():
        r["actions"] = actions
    report = {"label": label, "train_seed": train_seed, "inputs": inputs, "actions": actions, "suites": summaries,
              "averages": averages, "published": rows}
    return "\n".join(lines) + "\n", report


def _ours_tpt(summaries: dict[str, Any]) -> str:
    values = sorted({v for r in summaries.values() for v in r["trials_per_task_range"]})
    return "-" if not values else (str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")


def write_report(out: Path, md: str, report: dict[str, Any]) -> None:
    """report.md, then report.json, each atomically (data_tools/atomic.py): report.json is the mark of a finished
    report (the study's closed-loop step skips runs that have one), so it is never seen half-written."""
    from data_tools.atomic import write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.md", md)
    write_text(out / "report.json", json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.experiments.closed_loop_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 written, 2 bad input (no result files, unreadable file).")
    p.add_argument("results", nargs="+", type=Path, help="vla-eval output directories (or aggregate files)")
    p.add_argument("--out", type=Path, default=Path("reports/closed_loop"), help="output folder (default reports/closed_loop)")
    p.add_argument("--train-seed", type=int, default=None, help="the seed the checkpoint was trained with")
    p.add_argument("--label", default="this checkpoint", help="name of our row")
    p.add_argument("--inputs", default=DEFAULT_INPUTS,
                   help="what our policy saw (default: what vla_eval_server sends the model)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the checkpoint that was evaluated: its action representation is named in every row of ours")
    p.add_argument("--published", type=Path, default=PUBLISHED, help=f"anchors file (default {PUBLISHED.relative_to(ROOT)})")
    args = p.parse_args(argv)
    try:
        published = load_published(args.published)
        results, unmatched = collect(args.results, published["suites"])
    except (OSError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for u in unmatched:
        print(f"warning: {u} matches no suite of {args.published}; not in the report", file=sys.stderr)
    if not results:
        print("error: no result file matched a suite", file=sys.stderr)
        return 2
    actions = "not given (--checkpoint)"
    if args.checkpoint is not None:
        try:
            actions = checkpoint_actions(args.checkpoint)
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input, said in one line
            print(f"error: --checkpoint {args.checkpoint}: cannot read its action representation ({e})", file=sys.stderr)
            return 2
    md, report = render(results, published, args.label, args.train_seed, args.inputs, actions)
    write_report(args.out, md, report)
    print(md)
    print(f"wrote {(args.out / 'report.md').resolve()} and report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
