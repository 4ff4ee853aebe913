"""llava_vla_plugin.experiments.scaling: power-law fits with bootstrap intervals, and the report over run folders."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, subprocess_env
from llava_vla_plugin.experiments.scaling import bootstrap_power_law, build_report, fit_power_law

A, B, C = 40.0, 0.4, 0.7


def _law(x):
    return A * np.asarray(x, float) ** (-B) + C


def test_exact_points_recover_the_law():
    x = np.geomspace(1e3, 1e7, 6)
    fit = fit_power_law(x, _law(x))
    assert fit["b"] == pytest.approx(B, rel=1e-3)
    assert fit["a"] == pytest.approx(A, rel=1e-2) and fit["c"] == pytest.approx(C, abs=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_points_recover_b_within_interval(seed):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e3, 1e6, 10)
    y = _law(x) + rng.normal(0, 0.03, len(x))
    fit = bootstrap_power_law(x, y, n_boot=1000, seed=0)
    lo, hi = fit["ci"]["b"]
    assert lo <= B <= hi, (lo, fit["b"], hi)
    assert lo <= fit["b"] <= hi
    assert 0 < hi - lo < 0.25, f"interval [{lo:.3f}, {hi:.3f}] is too wide to be informative"
    lo_c, hi_c = fit["ci"]["c"]
    assert lo_c <= C <= hi_c
    # seeded: same interval twice
    assert bootstrap_power_law(x, y, n_boot=1000, seed=0)["ci"] == fit["ci"]


def test_accuracy_like_increasing_curves_fit():
    x = np.geomspace(10, 1e4, 7)
    y = 0.9 - 0.8 * x ** (-0.5)
    fit = fit_power_law(x, y)
    assert fit["b"] == pytest.approx(0.5, rel=1e-3) and fit["a"] == pytest.approx(-0.8, rel=1e-2)


def test_three_points_fit_without_interval_and_two_refused():
    x = np.array([1e3, 1e4, 1e5])
    fit = bootstrap_power_law(x, _law(x))
    assert fit["ci"] is None and any("exact" in w for w in fit["warnings"])
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1, 2], [3, 4])


def _make_run(runs: Path, name: str, mixture: str, fraction: float, frames: int, loss: float, steps: int = 100,
              final: bool = True, **extra) -> Path:
    d = runs / name
    (d / "out").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"run": name, "mixture": mixture, "model": "tiny", "fraction": fraction,
                                               "steps": steps, "planned_train_frames": frames}))
    (d / "launch.sh").write_text("#!/bin/sh\n")
    if final:
        tokens = steps * 8 * 800
        metrics = {"step": steps, "val_action_loss": loss, "val_action_accuracy": 0.5 / loss, "val_action_l1": loss / 10,
                   "train_frames": frames, "train_samples_seen": steps * 8, "train_tokens_seen": tokens,
                   "model_params": 1000, "compute_flops": 6 * 1000 * tokens, **extra}
        (d / "out/final_metrics.json").write_text(json.dumps(metrics))
        (d / "out/vla_metrics.jsonl").write_text(json.dumps({"step": steps, "val_action_loss": loss}) + "\n")
    return d


def test_report_with_fit_and_mixture_table(tmp_path):
    runs = tmp_path / "runs"
    rng = np.random.default_rng(0)
    fractions = [0.0625, 0.125, 0.25, 0.5, 1.0]
    for f in fractions:
        frames = int(64000 * f)
        _make_run(runs, f"frac{f:g}-mix_a-steps100-model_tiny", "a", f, frames, float(_law(frames) + rng.normal(0, 0.005)))
    _make_run(runs, "frac1-mix_b-steps100-model_tiny", "b", 1.0, 64000, 0.5)
    _make_run(runs, "frac0.5-mix_b-steps100-model_tiny", "b", 0.5, 32000, 0.8, final=False)  # unfinished
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.scaling", str(runs), "--x", "frames", "--y", "val_action_loss",
                           "--report", str(report), "--bootstrap", "300"], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "fit mixture=a" in proc.stdout
    result = json.loads((report / "scaling.json").read_text())
    assert result["n_runs"] == 7 and result["n_points"] == 6
    groups = {g["keys"]["mixture"]: g for g in result["groups"]}
    fit = groups["a"]["fit"]
    assert fit["ci"]["b"][0] <= B <= fit["ci"]["b"][1] and fit["b"] == pytest.approx(B, abs=0.1)
    assert groups["b"]["fit"] is None and "need at least 3" in groups["b"]["message"]
    assert any("no final_metrics.json" in m for m in result["messages"])
    with (report / "scaling.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["status"] for r in rows} == {"ok", "no final_metrics.json (unfinished?)"}
    assert all(r["fit_y"] for r in rows if r["mixture"] == "a")
    # frac1: mixtures a and b differ only in mixture -> compared, b (0.5) ranks before a (~0.99)
    (table,) = result["mixtures"]
    assert table["fraction"] == 1.0 and [r["mixture"] for r in table["rows"]] == ["b", "a"]
    with (report / "mixtures.csv").open() as f:
        assert [r["mixture"] for r in csv.DictReader(f)] == ["b", "a"]
    assert (report / "scaling.png").stat().st_size > 5000


def test_report_with_two_points_has_table_and_figure_but_no_fit(tmp_path):
    runs = tmp_path / "runs"
    _make_run(runs, "r1", "a", 0.5, 100, 2.0)
    _make_run(runs, "r2", "a", 1.0, 200, 1.5)
    result = build_report([runs], "compute", "val_action_loss", tmp_path / "report", n_boot=50)
    assert result["n_points"] == 2 and result["groups"][0]["fit"] is None
    assert any("need at least 3" in m for m in result["messages"])
    assert (tmp_path / "report/scaling.png").exists() and (tmp_path / "report/scaling.csv").exists()
    assert not (tmp_path / "report/mixtures.csv").exists() and result["mixtures"] == []


def test_missing_y_is_reported(tmp_path):
    runs = tmp_path / "runs"
    d = _make_run(runs, "r1", "a", 1.0, 100, 2.0)
    (d / "out/final_metrics.json").write_text(json.dumps({"step": 3, "train_frames": 100}))
    (d / "out/vla_metrics.jsonl").unlink()
    result = build_report([runs], "frames", "val_action_loss", tmp_path / "report", n_boot=50)
    assert result["n_points"] == 0 and "VAL_DATA" in result["runs"][0]["status"]


def test_x_that_barely_varies_is_not_fitted(tmp_path):
    runs = tmp_path / "runs"
    for i, f in enumerate([0.25, 0.5, 1.0]):  # same steps: tokens seen hardly change with the fraction
        _make_run(runs, f"r{i}", "a", f, int(1000 * f), 2.0 - i * 0.1, train_tokens_seen=640000 + i)
    result = build_report([runs], "tokens", "val_action_loss", tmp_path / "report", n_boot=50)
    assert result["groups"][0]["fit"] is None and "spans only" in result["groups"][0]["message"]
    result = build_report([runs], "frames", "val_action_loss", tmp_path / "report2", n_boot=50)
    assert result["groups"][0]["fit"] is not None


def test_runs_written_before_the_accuracy_rename_are_read_under_both_names(tmp_path):
    """final_metrics.json before the rename had `val_action_accuracy` (teacher-forced, full vocabulary);
    `--y val_action_accuracy` (old spelling) and the new name both read old and new runs."""
    runs = tmp_path / "runs"
    for i, f in enumerate([0.25, 0.5, 1.0]):  # _make_run writes the old name
        _make_run(runs, f"old{i}", "a", f, int(1000 * f), 2.0 - i * 0.3)
    d = _make_run(runs, "new", "a", 0.125, 125, 2.5)
    m = json.loads((d / "out/final_metrics.json").read_text())
    m["val_action_accuracy_teacher_forced"] = m.pop("val_action_accuracy")
    (d / "out/final_metrics.json").write_text(json.dumps(m))
    for y in ("val_action_accuracy_teacher_forced", "val_action_accuracy"):
        proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.scaling", str(runs), "--x", "frames", "--y", y,
                               "--report", str(tmp_path / y), "--bootstrap", "20"], env=subprocess_env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        result = json.loads((tmp_path / y / "scaling.json").read_text())
        assert result["n_points"] == 4, result["messages"]
