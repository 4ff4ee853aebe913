"""mixture_compare (issue 24 item 4): comparison sets, per-dataset numbers pooled over seeds against hand
computations, closed-loop success with Wilson intervals beside the anchors, the files and the exit codes.
The same command on real runs of a tiny sweep: tests/test_sweep.py::test_tiny_sweep_end_to_end."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env
from llava_vla_plugin.experiments.closed_loop_report import wilson_interval


def _run(runs: Path, name: str, mixture: str, seed: int, per_ds: dict, fraction: float = 1.0, closed: dict | None = None,
         final: bool = True) -> None:
    d = runs / name
    (d / "out").mkdir(parents=True)
    (d / "launch.sh").write_text("#!/bin/sh\n")
    (d / "config.json").write_text(json.dumps({"run": name, "mixture": mixture, "fraction": fraction, "model": "tiny",
                                               "steps": 100, "train_seed": seed}))
    if final:
        metrics = {"step": 100, "val_action_loss": 1.0}
        for ds, (acc, l1, tokens) in per_ds.items():
            metrics.update({f"val_{ds}_action_accuracy_teacher_forced_constrained": acc, f"val_{ds}_action_l1": l1,
                            f"val_{ds}_action_tokens": tokens, f"val_{ds}_frames": tokens // 7,
                            f"val_{ds}_action_accuracy_teacher_forced": acc - 0.1})
        (d / "out/final_metrics.json").write_text(json.dumps(metrics))
    if closed:
        (d / "closed_loop").mkdir()
        (d / "closed_loop/report.json").write_text(json.dumps({"suites": {
            s: {"successes": k, "trials": n} for s, (k, n) in closed.items()}}))


def test_sets_pooling_and_files(tmp_path):
    runs = tmp_path / "runs"
    _run(runs, "a0", "balanced", 0, {"bridge_orig": (0.50, 0.10, 700), "fractal": (0.80, 0.05, 140)},
         closed={"libero_spatial": (30, 50)})
    _run(runs, "a1", "balanced", 1, {"bridge_orig": (0.60, 0.08, 700), "fractal": (0.70, 0.07, 140)},
         closed={"libero_spatial": (35, 50)})
    _run(runs, "b0", "kept_frames", 0, {"bridge_orig": (0.40, 0.12, 700), "fractal": (0.90, 0.04, 140)})
    _run(runs, "c0", "balanced", 0, {"bridge_orig": (0.1, 0.3, 700)}, fraction=0.5)  # another budget: its own set
    _run(runs, "d0", "balanced", 2, {}, final=False)  # unfinished: skipped, said
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.mixture_compare", str(runs), "--out", str(out)],
                          env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped d0: no final_metrics.json" in proc.stderr
    result = json.loads((out / "mixture_compare.json").read_text())
    sets = {json.dumps(s["set"], sort_keys=True): s for s in result["sets"]}
    assert len(sets) == 2  # fraction 0.5 and 1.0 are never pooled
    full = next(s for s in result["sets"] if s["set"]["fraction"] == 1.0)
    bal, kept = (next(e for e in full["entries"] if e["mixture"] == m) for m in ("balanced", "kept_frames"))
    assert bal["seeds"] == [0, 1] and kept["seeds"] == [0]
    b = bal["datasets"]["bridge_orig"]
    assert b["accuracy"] == pytest.approx(0.55) and b["tokens"] == 1400 and b["seed_range"] == [0.5, 0.6]
    assert b["wilson95"] == pytest.approx(list(wilson_interval(350 + 420, 1400)))
    assert b["l1"] == pytest.approx(0.09)
    cl = bal["closed_loop"]["libero_spatial"]
    assert (cl["successes"], cl["trials"]) == (65, 100) and cl["wilson95"] == pytest.approx(list(wilson_interval(65, 100)))
    md = (out / "mixture_compare.md").read_text()
    assert "| balanced | 2 | 55.0 (" in md and "OpenVLA 7B (published, not re-run) | 84.7" in md
    rows = list(csv.DictReader(open(out / "mixture_compare.csv")))
    assert len(rows) == 2 * 2 + 1 and {r["mixture"] for r in rows} == {"balanced", "kept_frames"}
    png = (out / "mixture_compare.png").read_bytes()
    assert png[:4] == b"\x89PNG" and len(png) > 5000


def test_bad_input(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    cmd = [sys.executable, "-m", "llava_vla_plugin.experiments.mixture_compare", str(runs), "--out", str(tmp_path / "o")]
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no run folders" in proc.stderr
    _run(runs, "a0", "m", 0, {"x": (0.5, 0.1, 70)})
    _run(runs, "a0-again", "m", 0, {"x": (0.5, 0.1, 70)})  # the same seed twice
    proc = subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "share a training seed" in proc.stderr
    proc = subprocess.run(cmd + ["--by", "nope"], env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--by names a sweep axis" in proc.stderr
    assert not (tmp_path / "o").exists()
