"""Scaling laws from a sweep: collect each run's final metrics, fit L(x) = a * x^(-b) + c, report.

    python -m llava_vla_plugin.experiments.scaling RUNS [RUNS ...] --x frames|tokens|compute --y val_action_loss --report DIR
        [--bootstrap 1000] [--ci 0.95] [--seed 0] [--group-by mixture,model,steps]

A run is a folder with out/final_metrics.json (or final_metrics.json) and, from llava_vla_plugin.experiments.sweep,
config.json (fraction, mixture, model, steps). x: frames = `train_frames` (frames in the training
mixture), tokens = `train_tokens_seen`, compute = `compute_flops` (6 x params x tokens). y: any key of
final_metrics.json (default val_action_loss; the last vla_metrics.jsonl entry is a fallback), or closed-loop
success: closed_loop_success / closed_loop_<suite> / closed_loop_LIBERO from <run>/closed_loop/report.json
(`python -m llava_vla_plugin.experiments.closed_loop_report RESULTS --out <run>/closed_loop`).

Runs are grouped by the settings that are not the scale axis (frames: mixture, model, steps; tokens and
compute: mixture, model) and each group with at least 3 distinct x gets a fit. The fit is least squares
on y: for a fixed b the model is linear in (a, c), so b is found on a fine grid (profile likelihood) with
c >= 0 when every y is >= 0. Confidence intervals: residual bootstrap (seeded; residuals rescaled by
sqrt(n / (n - 3))), percentile intervals. Runs that share fraction, model and steps and differ only in
mixture are compared in a mixture table.

DIR gets scaling.json (everything), scaling.csv (one row per run), scaling.png (log-log, points, fits,
bootstrap bands) and, when there is a mixture comparison, mixtures.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.cli import add_common_flags, add_output, setup_logging

X_KEYS = {"frames": "train_frames", "tokens": "train_tokens_seen", "compute": "compute_flops"}
DEFAULT_GROUP_BY = {"frames": ("mixture", "model", "steps"), "tokens": ("mixture", "model"), "compute": ("mixture", "model")}
# Metrics renamed since (old final_metrics.json files are read under the new names): see trainer.METRIC_DOC.
RENAMED_METRICS = {"val_action_accuracy": "val_action_accuracy_teacher_forced"}
METRIC_COLUMNS = ("step", "val_action_loss", "val_action_accuracy_teacher_forced", "val_action_accuracy_teacher_forced_constrained",
                  "val_action_l1", "train_frames", "train_samples_seen",
                  "train_tokens_seen", "model_params", "compute_flops")
CONFIG_COLUMNS = ("mixture", "model", "fraction", "steps")
N_PARAMS = 3
B_BOUNDS = (1e-3, 5.0)
MIN_X_SPAN = 1.5  # max(x) / min(x) below which a fit is meaningless

__all__ = ["fit_power_law", "bootstrap_power_law", "collect_runs", "build_report", "main"]


# ----------------------------------------------------------------------------------------------
# Fitting


def _profile(z: np.ndarray, y: np.ndarray, nonneg_c: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (a, c) and SSE for every b of a grid, for every y row, in closed form.

    z: (G, n) = (x/x0)^-b for G values of b; y: (B, n). Returns a, c, sse of shape (B, G).
    """
    zm = z.mean(axis=1)  # (G,)
    ym = y.mean(axis=1)  # (B,)
    zc = z - zm[:, None]
    szz = (zc**2).sum(axis=1)  # (G,)
    szy = y @ zc.T  # (B, G)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(szz > 0, szy / szz, 0.0)
    c = ym[:, None] - a * zm[None, :]
    if nonneg_c:
        zz = (z**2).sum(axis=1)
        a0 = (y @ z.T) / zz[None, :]
        neg = c < 0
        a = np.where(neg, a0, a)
        c = np.where(neg, 0.0, c)
    # SSE directly (no cancellation-prone shortcut): sum over n of (y - a z - c)^2
    resid = y[:, None, :] - a[:, :, None] * z[None, :, :] - c[:, :, None]
    sse = (resid**2).sum(axis=2)
    return a, c, sse


def _fit_many(u: np.ndarray, y: np.ndarray, nonneg_c: bool, bounds: tuple[float, float] = B_BOUNDS) -> dict[str, np.ndarray]:
    """Fit every row of y (B, n) against u = x / x0 (n,). Two-stage grid over b, then (a, c) in closed form."""
    lu = np.log(u)
    grid = np.geomspace(bounds[0], bounds[1], 400)
    _, _, sse = _profile(np.exp(-grid[:, None] * lu[None, :]), y, nonneg_c)
    best = sse.argmin(axis=1)
    lo = grid[np.maximum(best - 1, 0)]
    hi = grid[np.minimum(best + 1, len(grid) - 1)]
    t = np.linspace(0.0, 1.0, 81)
    fine = lo[:, None] * (hi / lo)[:, None] ** t[None, :]  # (B, 81): geometric steps between the neighbours
    # per-row grids: evaluate row by row in one batch of shape (B, 81, n)
    z = np.exp(-fine[:, :, None] * lu[None, None, :])
    zm = z.mean(axis=2)
    zc = z - zm[:, :, None]
    szz = (zc**2).sum(axis=2)
    szy = np.einsum("bgn,bn->bg", zc, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(szz > 0, szy / szz, 0.0)
    c = y.mean(axis=1)[:, None] - a * zm
    if nonneg_c:
        a0 = np.einsum("bgn,bn->bg", z, y) / (z**2).sum(axis=2)
        neg = c < 0
        a = np.where(neg, a0, a)
        c = np.where(neg, 0.0, c)
    sse = ((y[:, None, :] - a[:, :, None] * z - c[:, :, None]) ** 2).sum(axis=2)
    k = sse.argmin(axis=1)
    rows = np.arange(len(y))
    return {"a": a[rows, k], "b": fine[rows, k], "c": c[rows, k], "sse": sse[rows, k]}


def fit_power_law(x: Sequence[float], y: Sequence[float], nonneg_c: bool | None = None) -> dict[str, float]:
    """Least-squares fit of y = a * x^(-b) + c. Returns a, b, c, x0 (the x scale used internally), sse."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if len(np.unique(x)) < N_PARAMS:
        raise ValueError(f"need at least {N_PARAMS} distinct x values for a*x^-b+c, got {len(np.unique(x))}")
    if np.any(x <= 0):
        raise ValueError("x must be > 0")
    if nonneg_c is None:
        nonneg_c = bool(np.all(y >= 0))
    x0 = float(np.exp(np.log(x).mean()))
    r = _fit_many(x / x0, y[None, :], nonneg_c)
    b = float(r["b"][0])
    return {"a": float(r["a"][0]) * x0**b, "b": b, "c": float(r["c"][0]), "x0": x0, "a_at_x0": float(r["a"][0]),
            "sse": float(r["sse"][0]), "nonneg_c": nonneg_c}


def predict(fit: Mapping[str, float], x: np.ndarray | float) -> np.ndarray:
    x = np.asarray(x, float)
    return fit["a_at_x0"] * (x / fit["x0"]) ** (-fit["b"]) + fit["c"]


def bootstrap_power_law(x: Sequence[float], y: Sequence[float], n_boot: int = 1000, ci: float = 0.95, seed: int = 0,
                        nonneg_c: bool | None = None) -> dict[str, Any]:
    """Point fit + residual-bootstrap percentile intervals for a, b, c (seeded, reproducible)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    fit = fit_power_law(x, y, nonneg_c)
    n = len(x)
    fitted = predict(fit, x)
    resid = y - fitted
    ss_tot = float(((y - y.mean()) ** 2).sum())
    out: dict[str, Any] = {
        **fit, "n_points": n, "rmse": float(math.sqrt(fit["sse"] / n)),
        "r2": float(1 - fit["sse"] / ss_tot) if ss_tot > 0 else None,
        "method": f"least squares on y; residual bootstrap, {n_boot} resamples, seed {seed}, percentile intervals",
        "ci_level": ci, "warnings": [],
    }
    lo_b, hi_b = B_BOUNDS
    if fit["b"] <= lo_b * 1.01 or fit["b"] >= hi_b * 0.99:
        out["warnings"].append(f"b = {fit['b']:.4g} is at the edge of the searched range [{lo_b}, {hi_b}]: "
                               "the points do not pin the exponent down")
    if n <= N_PARAMS:
        out["ci"] = None
        out["warnings"].append(f"{n} points for {N_PARAMS} parameters: the fit is exact, no confidence interval")
        return out
    rng = np.random.default_rng(seed)
    scaled = (resid - resid.mean()) * math.sqrt(n / (n - N_PARAMS))
    y_star = fitted[None, :] + scaled[rng.integers(0, n, size=(n_boot, n))]
    r = _fit_many(x / fit["x0"], y_star, fit["nonneg_c"])
    a = r["a"] * fit["x0"] ** r["b"]
    q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
    out["ci"] = {
        "a": [float(v) for v in np.percentile(a, q)],
        "b": [float(v) for v in np.percentile(r["b"], q)],
        "c": [float(v) for v in np.percentile(r["c"], q)],
    }
    out["_boot"] = {"a_at_x0": r["a"], "b": r["b"], "c": r["c"]}  # for bands; not serialised
    return out


# ----------------------------------------------------------------------------------------------
# Collecting runs


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
        return _with_new_names(data) if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _with_new_names(metrics: dict) -> dict:
    """Runs written before a metric was renamed: their values under the new name too (old kept)."""
    for old, new in RENAMED_METRICS.items():
        if old in metrics and new not in metrics:
            metrics[new] = metrics[old]
    return metrics


def _last_eval(path: Path) -> dict:
    last: dict = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    last = _with_new_names(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return last


def _run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / "config.json").is_file() and ((p / "out").is_dir() or (p / "launch.sh").is_file()) or (p / "final_metrics.json").is_file() \
                or (p / "out" / "final_metrics.json").is_file():
            found.append(p)
            continue
        for child in sorted(q for q in p.iterdir() if q.is_dir()) if p.is_dir() else []:
            if (child / "config.json").is_file() or (child / "final_metrics.json").is_file() or (child / "out" / "final_metrics.json").is_file():
                found.append(child)
    seen, out = set(), []
    for d in found:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append(d)
    return out


def collect_runs(paths: Iterable[str | Path], x: str, y: str) -> list[dict[str, Any]]:
    """One row per run folder: config fields, metrics, x and y, and a status saying why a run is not usable."""
    if x not in X_KEYS:
        raise ValueError(f"--x must be one of {', '.join(X_KEYS)}")
    rows = []
    for d in _run_dirs(paths):
        config = _read_json(d / "config.json") or {}
        out = d / "out" if (d / "out").is_dir() or not (d / "final_metrics.json").exists() else d
        final = _read_json(out / "final_metrics.json")
        row: dict[str, Any] = {"run": config.get("run") or d.name, "dir": str(d.resolve())}
        for k in CONFIG_COLUMNS:
            row[k] = config.get(k)
        if final is None:
            row.update(status="no final_metrics.json (unfinished?)", x=None, y=None)
            rows.append(row)
            continue
        for k in METRIC_COLUMNS:
            row[k] = final.get(k)
        metrics = dict(final)
        if y not in metrics:
            metrics.update({k: v for k, v in _last_eval(out / "vla_metrics.jsonl").items() if k not in metrics})
        if y.startswith("closed_loop_"):  # closed-loop success (closed_loop_report --out <run>/closed_loop)
            from llava_vla_plugin.experiments.closed_loop_report import closed_loop_metrics

            metrics.update(closed_loop_metrics(d))
        xv = metrics.get(X_KEYS[x])
        if xv is None and x == "frames":
            xv = config.get("planned_train_frames")
        if xv is None and x == "compute" and metrics.get("model_params") and metrics.get("train_tokens_seen"):
            xv = 6 * float(metrics["model_params"]) * float(metrics["train_tokens_seen"])
        yv = metrics.get(y)
        row["x"] = float(xv) if isinstance(xv, (int, float)) and not isinstance(xv, bool) else None
        row["y"] = float(yv) if isinstance(yv, (int, float)) and not isinstance(yv, bool) else None
        if row["x"] is None or not (row["x"] > 0 and math.isfinite(row["x"])):
            row["status"] = f"no usable {X_KEYS[x]} in final_metrics.json"
            row["x"] = None
        elif row["y"] is None or not math.isfinite(row["y"]):
            row["status"] = f"no usable {y} in final_metrics.json (was VAL_DATA set?)"
            row["y"] = None
        else:
            row["status"] = "ok"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Report


def _group_label(keys: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in keys.items()) or "all runs"


def _higher_is_better(y: str) -> bool:
    return "accuracy" in y or "success" in y


def mixture_tables(rows: list[dict[str, Any]], y: str) -> list[dict[str, Any]]:
    """Runs with the same fraction, model and steps and different mixtures, ranked by y."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] != "ok" or r.get("mixture") is None:
            continue
        groups.setdefault((r.get("fraction"), r.get("model"), r.get("steps")), []).append(r)
    tables = []
    for (fraction, model, steps), members in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        if len({m["mixture"] for m in members}) < 2:
            continue
        ordered = sorted(members, key=lambda m: -m["y"] if _higher_is_better(y) else m["y"])
        tables.append({
            "fraction": fraction, "model": model, "steps": steps, "metric": y,
            "rows": [{"rank": i + 1, "mixture": m["mixture"], y: m["y"], "val_action_loss": m.get("val_action_loss"),
                      "val_action_accuracy_teacher_forced": m.get("val_action_accuracy_teacher_forced"), "val_action_l1": m.get("val_action_l1"),
                      "train_frames": m.get("train_frames"), "run": m["run"]} for i, m in enumerate(ordered)],
        })
    return tables


def build_report(paths: Sequence[str | Path], x: str, y: str, report: str | Path, n_boot: int = 1000, ci: float = 0.95,
                 seed: int = 0, group_by: Sequence[str] | None = None) -> dict[str, Any]:
    report = Path(report)
    rows = collect_runs(paths, x, y)
    group_by = tuple(group_by) if group_by is not None else DEFAULT_GROUP_BY[x]
    messages: list[str] = []
    if not rows:
        raise FileNotFoundError(f"no run folders under {', '.join(map(str, paths))} (a run has config.json or out/final_metrics.json)")
    for r in rows:
        if r["status"] != "ok":
            messages.append(f"{r['run']}: skipped: {r['status']}")
    ok = [r for r in rows if r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault(tuple(r.get(k) for k in group_by), []).append(r)
    group_results = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        keys = dict(zip(group_by, key))
        label = _group_label(keys)
        members.sort(key=lambda m: m["x"])
        for m in members:
            m["group"] = label
        xs = np.array([m["x"] for m in members])
        ys = np.array([m["y"] for m in members])
        g: dict[str, Any] = {"label": label, "keys": keys, "n_points": len(members), "runs": [m["run"] for m in members],
                             "fit": None, "message": None, "_xy": (xs, ys)}
        n_distinct = len(np.unique(xs))
        if n_distinct < N_PARAMS:
            g["message"] = (f"{label}: {len(members)} point(s) at {n_distinct} distinct {x} value(s): need at least "
                            f"{N_PARAMS} for a fit of L = a * x^-b + c; table and figure only")
            messages.append(g["message"])
        elif xs.max() / xs.min() < MIN_X_SPAN:
            g["message"] = (f"{label}: {x} spans only {xs.min():.4g}..{xs.max():.4g} (x{xs.max() / xs.min():.3g}); a scaling "
                            f"fit needs at least x{MIN_X_SPAN:g} (did the runs vary this axis? e.g. tokens at fixed steps "
                            "do not change with the data fraction); table and figure only")
            messages.append(g["message"])
        else:
            fit = bootstrap_power_law(xs, ys, n_boot=n_boot, ci=ci, seed=seed)
            g["_boot"] = fit.pop("_boot", None)
            g["fit"] = fit
            for w in fit["warnings"]:
                messages.append(f"{label}: {w}")
            for m in members:
                m["fit_y"] = float(predict(fit, m["x"]))
        group_results.append(g)
    mixtures = mixture_tables(rows, y)

    report.mkdir(parents=True, exist_ok=True)
    result = {
        "x": x, "x_key": X_KEYS[x], "y": y, "group_by": list(group_by), "n_runs": len(rows), "n_points": len(ok),
        "runs": rows, "groups": [{k: v for k, v in g.items() if not k.startswith("_")} for g in group_results],
        "mixtures": mixtures, "messages": messages,
        "files": {"json": "scaling.json", "csv": "scaling.csv", "figure": "scaling.png",
                  **({"mixtures": "mixtures.csv"} if mixtures else {})},
    }
    _write_csv(report / "scaling.csv", rows, ["run", "status", "group", *CONFIG_COLUMNS, "x", "y", "fit_y", *METRIC_COLUMNS])
    if mixtures:
        flat = [{"fraction": t["fraction"], "model": t["model"], "steps": t["steps"], **r} for t in mixtures for r in t["rows"]]
        cols = ["fraction", "model", "steps", "rank", "mixture", y, "val_action_loss", "val_action_accuracy_teacher_forced", "val_action_l1",
                "train_frames", "run"]
        _write_csv(report / "mixtures.csv", flat, list(dict.fromkeys(cols)))
    _plot(report / "scaling.png", group_results, x, y, ci)
    (report / "scaling.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})


def _plot(path: Path, groups: list[dict[str, Any]], x: str, y: str, ci: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    all_y = []
    for i, g in enumerate(groups):
        colour = f"C{i % 10}"
        xs, ys = np.array(g["_xy"][0]), np.array(g["_xy"][1])
        all_y.extend(ys.tolist())
        fit = g["fit"]
        label = g["label"]
        if fit is not None:
            b_ci = fit["ci"]["b"] if fit.get("ci") else None
            label += f": b={fit['b']:.3g}" + (f" [{b_ci[0]:.3g}, {b_ci[1]:.3g}]" if b_ci else "") + f", c={fit['c']:.3g}"
        ax.scatter(xs, ys, color=colour, zorder=3, label=label)
        if fit is not None:
            grid = np.geomspace(xs.min() / 1.5, xs.max() * 1.5, 200)
            ax.plot(grid, predict(fit, grid), color=colour, lw=1.5)
            boot = g.get("_boot")
            if boot is not None:
                curves = boot["a_at_x0"][:, None] * (grid[None, :] / fit["x0"]) ** (-boot["b"][:, None]) + boot["c"][:, None]
                q = [(1 - ci) / 2 * 100, (1 + ci) / 2 * 100]
                lo, hi = np.percentile(curves, q, axis=0)
                ax.fill_between(grid, lo, hi, color=colour, alpha=0.15, lw=0)
        elif len(xs) > 1:
            ax.plot(xs, ys, color=colour, lw=0.8, ls="--")
    ax.set_xscale("log")
    if all_y and min(all_y) > 0:
        ax.set_yscale("log")
    ax.set_xlabel(f"{x} ({X_KEYS[x]})")
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}: L = a * x^-b + c" + ("" if any(g["fit"] for g in groups) else " (too few points for a fit)"))
    ax.grid(True, which="both", alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.experiments.scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="runs folder(s) of a sweep, or run folders")
    p.add_argument("--x", choices=sorted(X_KEYS), default="frames")
    p.add_argument("--y", default="val_action_loss", help="a key of final_metrics.json (default val_action_loss), or "
                   "closed_loop_success / closed_loop_<suite> (the run's closed_loop/report.json); "
                   "val_action_accuracy (renamed val_action_accuracy_teacher_forced) still reads older runs")
    add_output(p, "--report", type=str, metavar="DIR", help="folder for scaling.json/.csv/.png (+ mixtures.csv)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--ci", type=float, default=0.95, help="confidence level (default 0.95)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--group-by", help="comma-separated config keys to fit separately (default: all but the scale axes)")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    setup_logging(args)
    if not 0 < args.ci < 1 or args.bootstrap < 10:
        p.error("--ci must be in (0, 1) and --bootstrap >= 10")
    group_by = [g for g in args.group_by.split(",") if g] if args.group_by is not None else None
    try:
        result = build_report(args.runs, args.x, RENAMED_METRICS.get(args.y, args.y), args.out, args.bootstrap, args.ci, args.seed, group_by)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    print(f"wrote {Path(args.out) / 'scaling.json'}, scaling.csv, scaling.png" + (", mixtures.csv" if result["mixtures"] else ""))
    return 0 if result["n_points"] else 1


def format_summary(result: Mapping[str, Any]) -> str:
    lines = [f"{result['y']} vs {result['x']} ({result['x_key']}): {result['n_points']} usable of {result['n_runs']} run(s)"]
    for r in result["runs"]:
        if r["status"] == "ok":
            lines.append(f"  {r['run']}: x={r['x']:.6g} y={r['y']:.6g}")
    for g in result["groups"]:
        f = g["fit"]
        if f is None:
            continue
        ci = f.get("ci")
        fmt = lambda k: f"{f[k]:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if ci else "")  # noqa: E731
        lines.append(f"fit {g['label']} ({g['n_points']} points): L = a * x^-b + c, a={fmt('a')} b={fmt('b')} c={fmt('c')}"
                     + (f" R2={f['r2']:.3f}" if f.get("r2") is not None else ""))
    for t in result["mixtures"]:
        lines.append(f"mixtures at fraction={t['fraction']} model={t['model']} steps={t['steps']}:")
        for r in t["rows"]:
            lines.append(f"  {r['rank']}. {r['mixture']}: {t['metric']}={r[t['metric']]:.6g}")
    lines.extend(f"note: {m}" for m in result["messages"])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
