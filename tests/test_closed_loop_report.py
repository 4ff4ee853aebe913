"""closed_loop_report: Wilson intervals against hand computations, suites from vla-eval aggregate files, the
published anchors marked as not re-run, the command line. The aggregate files here have the layout vla-eval
0.8.0 writes (results/export.py: benchmark, config.name, tasks[].episodes[].metrics.success,
failure_reason); test_closed_loop's eval-demo test runs the tool on a real one."""
from __future__ import annotations

import json

import pytest

from conftest import run_py
from llava_vla_plugin.experiments.closed_loop_report import collect, load_published, render, suite_of, wilson_interval


def test_wilson_interval_by_hand():
    # 42/50: p = .84, z^2 = 3.8415; centre = (.84 + 3.8415/100) / (1 + 3.8415/50) = .878415/1.07683 = .81574;
    # half = 1.96/1.07683 * sqrt(.84*.16/50 + 3.8415/10000) = 1.82015 * .055427 = .10089
    lo, hi = wilson_interval(42, 50)
    assert lo == pytest.approx(0.7149, abs=1e-4) and hi == pytest.approx(0.9166, abs=1e-4)
    # 0/10: lower 0, upper = z^2/n / (1 + z^2/n) = .38415 / 1.38415 = .27753
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    # 10/10 mirrors 0/10
    assert wilson_interval(10, 10)[0] == pytest.approx(1 - 0.27753, abs=1e-5)
    # 1270/1500 (OpenVLA-size: 150 trials per task x 10 tasks): p = .84667, half ~ 1.96*sqrt(p(1-p)/n) = .01823
    lo, hi = wilson_interval(1270, 1500)
    assert hi - lo == pytest.approx(2 * 0.01823, abs=2e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _aggregate(name: str, tasks: dict[str, list[bool | None]]) -> dict:
    def ep(i, s):
        row = {"episode_id": i, "metrics": {"success": bool(s)}, "steps": 10}
        if s is None:  # an errored episode: vla-eval keeps it, as a failure, with a failure_reason
            row["failure_reason"] = "error"
        return row

    return {"benchmark": name, "config": {"name": name, "benchmark": "x:Y"}, "harness_version": "0.8.0",
            "tasks": [{"task": t, "episodes": [ep(i, s) for i, s in enumerate(v)]} for t, v in tasks.items()]}


@pytest.fixture()
def results(tmp_path):
    suites = {"libero_spatial": 9, "libero_object": 8, "libero_goal": 7, "libero_10": 5}
    for suite, k in suites.items():  # 2 tasks x 5 trials; k successes
        flags = [True] * k + [False] * (10 - k)
        (tmp_path / suite).mkdir()
        (tmp_path / suite / f"{suite}_aggregate.json").write_text(json.dumps(
            _aggregate(suite, {"task a": flags[:5], "task b": flags[5:]})))
    (tmp_path / "simpler").mkdir()
    for task, flags in (("pick_coke_can", [True, None, False]), ("move_near", [False, False, False])):
        name = f"simpler_google_robot_{task}"
        (tmp_path / "simpler" / f"{name}_aggregate.json").write_text(json.dumps(_aggregate(name, {task: flags})))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "calvin_aggregate.json").write_text(json.dumps(_aggregate("calvin", {"t": [True]})))
    return tmp_path


def test_collect_and_render(results):
    published = load_published()
    assert suite_of("simpler_widowx_stack_cube", published["suites"]) == "simpler_widowx"
    got, unmatched = collect([results], published["suites"])
    assert [u.endswith("(calvin)") for u in unmatched] == [True]
    assert (got["libero_spatial"].successes, got["libero_spatial"].trials) == (9, 10)
    g = got["simpler_google_robot"]
    assert (g.successes, g.trials, g.errors, len(g.trials_per_task)) == (1, 6, 1, 2)

    md, report = render(got, published, "tiny", 7, "third-person image only")
    assert report["train_seed"] == 7 and "Training seed: 7" in md
    spatial = report["suites"]["libero_spatial"]
    assert spatial["success_pct"] == 90.0 and spatial["trials_per_task_range"] == [5, 5]
    lo, hi = wilson_interval(9, 10)
    assert spatial["wilson95_pct"] == [round(100 * lo, 2), round(100 * hi, 2)]
    assert report["averages"]["LIBERO"]["success_pct"] == pytest.approx((90 + 80 + 70 + 50) / 4)
    openvla = next(r for r in report["published"] if r["model"] == "OpenVLA 7B")
    assert openvla["libero_spatial"] == 84.7 and openvla["LIBERO"] == 76.5 and openvla["published_not_rerun"]
    oft = next(r for r in report["published"] if r["model"] == "OpenVLA-OFT")
    assert oft["LIBERO"] == 97.1 and "wrist camera" in oft["inputs"] and "proprio" in oft["inputs"]
    rows = [l for l in md.splitlines() if l.startswith("| ") and "(published, not re-run) |" in l]
    assert len(rows) == len(report["published"]) >= 6


def test_cli_writes_the_report(results, tmp_path):
    out = tmp_path / "report"
    proc = run_py(["-m", "llava_vla_plugin.experiments.closed_loop_report", str(results / "libero_spatial"), str(results / "libero_10"),
                   "--out", str(out), "--train-seed", "3"])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["suites"]) == ["libero_10", "libero_spatial"] and report["averages"] == {}
    assert "published, not re-run" in (out / "report.md").read_text()
    bad = run_py(["-m", "llava_vla_plugin.experiments.closed_loop_report", str(tmp_path / "nothing_here"), "--out", str(out)])
    assert bad.returncode == 2 and "aggregate" in bad.stderr
    # --checkpoint: the evaluated checkpoint's representation is named in every row of ours (issue 23 item 4)
    from llava_vla_plugin.core.representations import ActionReprConfig

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ActionReprConfig(name="bins_chunk", horizon=8).save(ckpt)
    proc = run_py(["-m", "llava_vla_plugin.experiments.closed_loop_report", str(results / "libero_spatial"),
                   "--out", str(out), "--checkpoint", str(ckpt)])
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["actions"] == "bins_chunk H=8 (oft windows)" == report["suites"]["libero_spatial"]["actions"]
    md = (out / "report.md").read_text().splitlines()
    ours = [l for l in md if l.startswith("| Spatial |") or l.startswith("| **ours")]
    assert len(ours) == 2 and all(l.endswith("| bins_chunk H=8 (oft windows) |") for l in ours), ours
    openvla = next(l for l in md if l.startswith("| OpenVLA 7B (published"))
    assert openvla.endswith("| bins H=1 (256 bins, autoregressive) |")
    bad = run_py(["-m", "llava_vla_plugin.experiments.closed_loop_report", str(results / "libero_spatial"),
                  "--out", str(out), "--checkpoint", str(tmp_path / "gone")])
    assert bad.returncode == 2 and "--checkpoint" in bad.stderr and "gone" in bad.stderr


def test_scaling_takes_closed_loop_success_as_y(results, tmp_path):
    """A run's report written with --out <run>/closed_loop is scaling.py's y: closed_loop_success (the LIBERO
    average when all four suites are there), closed_loop_<suite>."""
    from llava_vla_plugin.experiments.closed_loop_report import main as report_main
    from llava_vla_plugin.experiments.scaling import collect_runs
    from test_scaling import _make_run

    runs = tmp_path / "runs"
    for i, frames in enumerate((1000, 2000, 4000)):
        d = _make_run(runs, f"r{i}", "libero_4_suites", 0.25 * (i + 1), frames, 1.0)
        suites = ["libero_spatial", "libero_object", "libero_goal", "libero_10"] if i else ["libero_spatial"]
        assert report_main([*(str(results / s) for s in suites), "--out", str(d / "closed_loop")]) == 0
    rows = {r["run"]: r for r in collect_runs([runs], "frames", "closed_loop_success")}
    assert rows["r1"]["y"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.5) / 4) and rows["r1"]["x"] == 2000
    assert rows["r0"]["y"] == pytest.approx(0.9)  # one suite: its success
    rows = {r["run"]: r for r in collect_runs([runs], "frames", "closed_loop_libero_10")}
    assert rows["r2"]["y"] == pytest.approx(0.5) and rows["r0"]["y"] is None and "closed_loop_libero_10" in rows["r0"]["status"]
