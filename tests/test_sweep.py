"""llava_vla_plugin.experiments.sweep: a grid spec -> run folders and launchers; finished runs never run again.

Training is replaced by a stub finetune script (FINETUNE_SCRIPT) that records its call and writes
final_metrics.json, so these tests take seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, requires_upstream, subprocess_env
from llava_vla_plugin.experiments.closed_loop_report import wilson_interval
from llava_vla_plugin.experiments.sweep import SweepError, load_spec, plan_sweep, write_sweep
from test_mixture_tool import _write_converted

STUB = r"""#!/usr/bin/env bash
set -eu
echo "$(basename "$(dirname "$OUTPUT_DIR")") MODEL=$MODEL MAX_STEPS=$MAX_STEPS DATA=$DATA VAL_DATA=${VAL_DATA:-} NUM_GPUS=$NUM_GPUS ARGS=$*" >> "$STUB_CALLS"
if [ "${STUB_FAIL:-}" = "$(basename "$(dirname "$OUTPUT_DIR")")" ]; then echo "stub failure" >&2; exit 3; fi
echo '{"step": 1, "val_action_loss": 1.0, "train_frames": 1}' > "$OUTPUT_DIR/final_metrics.json"
"""

EXPECTED = [
    "frac0.25-mix_bridge_only-steps3-model_tiny",
    "frac0.25-mix_two-steps3-model_tiny",
    "frac0.5-mix_bridge_only-steps3-model_tiny",
    "frac0.5-mix_two-steps3-model_tiny",
]


@pytest.fixture()
def sweep(tmp_path):
    converted = _write_converted(tmp_path / "converted")
    weights = tmp_path / "two.yaml"
    weights.write_text("bridge_orig: 1\nfractal20220817_data: 1\n")
    spec = {
        "name": "unit", "converted": str(converted), "seed": 5,
        "env": {"NUM_GPUS": 0, "BATCH_SIZE": 2, "EVAL_STEPS": 1},
        "args": ["--seed", "0"],
        "grid": {"fraction": [0.25, 0.5], "mixture": [{"name": "bridge_only", "weights": {"bridge_orig": 1}}, str(weights)],
                 "model": [{"name": "tiny", "path": str(tmp_path / "model-qwen")}], "steps": 3},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    stub = tmp_path / "stub_finetune.sh"
    stub.write_text(STUB)
    env = subprocess_env({"FINETUNE_SCRIPT": str(stub), "STUB_CALLS": str(tmp_path / "calls.txt")})
    return path, tmp_path / "runs", env, tmp_path / "calls.txt"


def _sweep(*args, env):
    return subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.sweep", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def _calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_run_folders_deterministically(sweep, tmp_path):
    spec, runs, env, _ = sweep
    p = _sweep(spec, "-o", runs, env=env)
    assert p.returncode == 0, p.stderr
    assert sorted(d.name for d in runs.iterdir() if d.is_dir()) == EXPECTED
    for name in EXPECTED:
        d = runs / name
        assert {f.name for f in d.iterdir()} == {"mixture.yaml", "config.json", "launch.sh"}
        assert os.access(d / "launch.sh", os.X_OK)
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["run"] == name and cfg["steps"] == 3 and cfg["model"] == "tiny" and cfg["seed"] == 5
        assert cfg["env"]["VAL_DATA"] == str(runs / "val_mixture.yaml") and cfg["env"]["MAX_STEPS"] == "3"
        mix = yaml.safe_load((d / "mixture.yaml").read_text())
        assert mix["vla_mixture"]["fraction"] == cfg["fraction"] and mix["vla_mixture"]["balance"] is True
        assert cfg["planned_train_frames"] == mix["vla_mixture"]["effective_frames"]
    # bridge_only at 0.5: half of bridge's 40 frames; two (balanced 400:100) at 0.25 of 60 frames
    assert json.loads((runs / EXPECTED[2] / "config.json").read_text())["planned_train_frames"] == 20
    assert json.loads((runs / EXPECTED[1] / "config.json").read_text())["mixture_shares"] == pytest.approx(
        {"bridge_orig": 0.8, "fractal20220817_data": 0.2})
    # validation data shared by all runs: val.jsonl of every dataset used
    val = yaml.safe_load((runs / "val_mixture.yaml").read_text())
    assert sorted(Path(d["json_path"]).parent.name for d in val["datasets"]) == ["bridge_orig", "fractal20220817_data"]
    launch_all = (runs / "launch_all.sh").read_text()
    assert all(n in launch_all for n in EXPECTED)
    # writing again changes nothing
    before = _digest(runs)
    assert _sweep(spec, "-o", runs, env=env).returncode == 0
    assert _digest(runs) == before
    # --dry-run writes nothing
    other = tmp_path / "other"
    p = _sweep(spec, "-o", other, "--dry-run", env=env)
    assert p.returncode == 0 and not other.exists() and EXPECTED[0] in p.stderr


def test_launch_then_relaunch_runs_nothing(sweep):
    spec, runs, env, calls = sweep
    p = _sweep(spec, "-o", runs, "--launch", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    first = _calls(calls)
    assert sorted(c.split()[0] for c in first) == EXPECTED  # each run once, in order of the grid
    line = next(c for c in first if c.startswith(EXPECTED[0]))
    assert f"DATA={runs / EXPECTED[0] / 'mixture.yaml'}" in line and "MAX_STEPS=3" in line and "NUM_GPUS=0" in line
    assert "--vla_data_seed 5 --seed 0" in line and f"VAL_DATA={runs / 'val_mixture.yaml'}" in line
    assert all((runs / n / "out/final_metrics.json").exists() and (runs / n / "train.log").exists() for n in EXPECTED)

    # relaunch through every path: nothing runs
    p = _sweep(spec, "-o", runs, "--launch", env=env)
    assert p.returncode == 0, p.stderr
    assert "nothing to run" in p.stderr and all(f"skipped (finished): {n}" in p.stderr for n in EXPECTED)
    p = subprocess.run(["bash", str(runs / "launch_all.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ran 0, skipped 4, failed 0" in p.stdout
    p = subprocess.run(["bash", str(runs / EXPECTED[0] / "launch.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "skipped" in p.stdout
    p = _sweep(spec, "-o", runs, "--print", env=env)
    assert p.returncode == 0 and p.stdout == "" and p.stderr.count("skipped (finished)") == 4
    assert _calls(calls) == first

    # an unfinished run (no final_metrics.json) runs again, only it
    (runs / EXPECTED[3] / "out/final_metrics.json").unlink()
    p = _sweep(spec, "-o", runs, "--print", env=env)
    assert p.stdout.splitlines() == [f"bash {runs / EXPECTED[3] / 'launch.sh'}"]
    p = subprocess.run(["bash", str(runs / "launch_all.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "ran 1, skipped 3, failed 0" in p.stdout
    assert [c.split()[0] for c in _calls(calls)[len(first):]] == [EXPECTED[3]]


def test_failed_run_is_reported_and_others_run(sweep):
    spec, runs, env, calls = sweep
    p = _sweep(spec, "-o", runs, "--launch", env={**env, "STUB_FAIL": EXPECTED[1]})
    assert p.returncode != 0
    assert f"FAILED: {EXPECTED[1]}" in p.stderr and "ran 3, skipped 0, failed 1" in p.stdout
    assert not (runs / EXPECTED[1] / "out/final_metrics.json").exists()
    p = _sweep(spec, "-o", runs, "--launch", env=env)  # the failed one runs again, the rest are skipped
    assert p.returncode == 0 and "ran 1, skipped 3, failed 0" in p.stdout


def test_started_run_with_changed_config_is_refused(sweep):
    spec_path, runs, env, _ = sweep
    assert _sweep(spec_path, "-o", runs, "--launch", env=env).returncode == 0
    spec = yaml.safe_load(spec_path.read_text())
    spec["env"]["BATCH_SIZE"] = 4
    spec_path.write_text(yaml.safe_dump(spec))
    p = _sweep(spec_path, "-o", runs, env=env)
    assert p.returncode == 2 and "different configuration" in p.stderr and "env" in p.stderr


def test_action_representation_and_horizon_are_a_grid_axis(sweep):
    """grid.action_repr sets ACTION_REPR / HORIZON / WINDOW_MODE in each launch.sh; the launcher sees them."""
    spec_path, runs, env, calls = sweep
    spec = yaml.safe_load(spec_path.read_text())
    spec["grid"].update(fraction=[0.5], mixture=[{"name": "b", "weights": {"bridge_orig": 1}}],
                        action_repr=["bins", {"repr": "bins_chunk", "horizon": 4},
                                     {"repr": "parallel_l1", "horizon": 8, "window_mode": "openvla"}])
    spec_path.write_text(yaml.safe_dump(spec))
    p = _sweep(spec_path, "-o", runs, "--dry-run", env=env)
    names = [f"frac0.5-mix_b-steps3-model_tiny-action_{a}" for a in ("bins", "bins_chunk-H4", "parallel_l1-H8-openvla")]
    assert p.returncode == 0 and all(n in p.stderr for n in names) and not runs.exists(), p.stderr
    assert _sweep(spec_path, "-o", runs, env=env).returncode == 0  # write the launchers, run nothing
    want = {names[0]: ("bins", "1", None), names[1]: ("bins_chunk", "4", None), names[2]: ("parallel_l1", "8", "openvla")}
    for name, (rep, h, mode) in want.items():
        launch = (runs / name / "launch.sh").read_text()
        assert f"export ACTION_REPR={rep}\n" in launch and f"export HORIZON={h}\n" in launch
        assert ("export WINDOW_MODE=openvla\n" in launch) == (mode is not None)
        cfg = json.loads((runs / name / "config.json").read_text())
        assert cfg["action_repr_config"]["name"] == rep and cfg["action_repr_config"]["horizon"] == int(h)
    # the finetune script gets them (stub records its environment)
    stub = Path(env["FINETUNE_SCRIPT"])
    stub.write_text(STUB.replace("ARGS=$*", "ACTION_REPR=$ACTION_REPR HORIZON=$HORIZON ARGS=$*"))
    subprocess.run(["bash", str(runs / names[2] / "launch.sh")], env=env, check=True, capture_output=True, timeout=60)
    assert "ACTION_REPR=parallel_l1 HORIZON=8" in _calls(calls)[-1]
    # `bins` with H > 1, unknown names and env clashes fail when the sweep is planned (in-process: no torch start-up)
    for bad, match in (({"repr": "bins", "horizon": 4}, "bins_chunk or parallel_l1"), ("diffusion", "unknown action")):
        with pytest.raises(SweepError, match=match):
            plan_sweep({**spec, "grid": {**spec["grid"], "action_repr": [bad]}}, runs.parent / "bad")
    with pytest.raises(SweepError, match="set them in one place"):
        plan_sweep({**spec, "env": {**spec["env"], "HORIZON": 8}}, runs.parent / "bad")


def test_fast_and_its_vocabulary_size_are_swept_like_any_representation(sweep, tmp_path):
    """fast's vocabulary size is one fitted tokenizer per entry (options.tokenizer -> REPR_OPTIONS); a tokenizer
    fitted for another H, or a missing one, fails when the sweep is planned, not on the cluster."""
    from llava_vla_plugin.core.fast_codec import FastCodec

    spec_path, runs, env, _ = sweep
    rng = np.random.default_rng(0)
    windows = [np.cumsum(rng.normal(0, 0.05, (4, 7)), axis=0) for _ in range(200)]
    for v in (200, 300):
        FastCodec.fit(windows, vocab_size=v).save(tmp_path / f"fast_v{v}")
    spec = yaml.safe_load(spec_path.read_text())
    spec["grid"].update(fraction=[0.5], mixture=[{"name": "b", "weights": {"bridge_orig": 1}}],
                        action_repr=[{"repr": "fast", "horizon": 4, "options": {"tokenizer": str(tmp_path / f"fast_v{v}")}}
                                     for v in (200, 300)])
    planned, _ = plan_sweep(spec, runs)
    assert [r.name.rsplit("action_", 1)[1] for r in planned] == ["fast-H4-fast_v200", "fast-H4-fast_v300"]
    for run, v in zip(planned, (200, 300)):
        assert run.env["REPR_OPTIONS"] == f"tokenizer={tmp_path / f'fast_v{v}'}" and run.env["ACTION_REPR"] == "fast"
        assert run.config["action_repr_config"]["options"] == {"tokenizer": str(tmp_path / f"fast_v{v}")}
    for entry, match in (({"repr": "fast", "horizon": 8, "options": {"tokenizer": str(tmp_path / "fast_v200")}},
                          "fitted for H=4"),
                         ({"repr": "fast", "horizon": 4}, "vla-fit-fast"),
                         ({"repr": "bins", "options": {"tokenizer": "x"}}, "takes no --vla_repr_options")):
        with pytest.raises(SweepError, match=match):
            plan_sweep({**spec, "grid": {**spec["grid"], "action_repr": [entry]}}, runs.parent / "bad")


def test_spec_errors(tmp_path):
    converted = _write_converted(tmp_path / "converted")

    def plan(**over):
        spec = {"converted": str(converted), "grid": {"mixture": [{"name": "b", "weights": {"bridge_orig": 1}}], "model": ["m"]}}
        spec.update(over)
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(spec))
        return plan_sweep(load_spec(path), tmp_path / "runs")

    runs, info = plan()
    assert [r.name for r in runs] == ["frac1-mix_b-stepsall-model_m"]
    with pytest.raises(SweepError, match="MODEL"):
        plan(env={"MODEL": "x"})
    with pytest.raises(SweepError, match="unknown grid axis"):
        plan(grid={"mixture": ["bridge_rt_1"], "model": ["m"], "lr": [1]})
    with pytest.raises(SweepError, match="not converted"):
        plan(grid={"mixture": ["rtx"], "model": ["m"]})
    with pytest.raises(SweepError, match="duplicate"):
        plan(grid={"mixture": [{"name": "b", "weights": {"bridge_orig": 1}}], "model": ["a/m", "b/m"]})
    with pytest.raises(SweepError, match="fraction"):
        plan(grid={"mixture": ["bridge_rt_1"], "model": ["m"], "fraction": [0]})
    with pytest.raises(SweepError, match="unknown key"):
        plan(gird={})
    runs, info = plan(val_data=None)
    assert "VAL_DATA" not in runs[0].env
    write_sweep(runs, info)
    assert not (tmp_path / "runs/val_mixture.yaml").exists()


def test_example_spec_is_valid(tmp_path):
    """configs/sweeps/example.yaml plans against a converted folder holding its datasets."""
    spec = load_spec(ROOT / "configs/sweeps/example.yaml")
    spec["converted"] = str(_write_converted(tmp_path / "converted"))
    spec.pop("image_folder")
    runs, info = plan_sweep(spec, tmp_path / "runs")
    assert len(runs) == 8 and info["val"]["per_dataset"] == 2000
    assert "frac0.125-mix_bridge_rt_1-steps5000-model_ov-0.5b" in [r.name for r in runs]


def test_mixture_study_spec_is_valid(tmp_path):
    """configs/sweeps/mixture_study.yaml (the README's mixture study): 3 mixtures x 3 training seeds at one budget,
    each mixture's shares by its own rule, the same shares for every seed of a mixture."""
    spec = load_spec(ROOT / "configs/sweeps/mixture_study.yaml")
    spec["converted"] = str(_write_converted(tmp_path / "converted"))  # bridge 400, fractal 100 transitions
    runs, info = plan_sweep(spec, tmp_path / "runs")
    assert len(runs) == 9 and {r.config["steps"] for r in runs} == {5000}
    # its closed loop: SimplerEnv, each robot with its dataset's statistics (not run in CI)
    benches = info["closed_loop"]["benchmarks"]
    assert [(b["name"], b["unnorm_key"]) for b in benches] == [("simpler_widowx", "bridge_orig"),
                                                               ("simpler_google_robot", "fractal20220817_data")]
    assert all(b["server_args"] == ["--image-key", "primary", "--gripper", "raw", "--rotation", "euler_to_axisangle"]
               for b in benches)
    shares = {r.config["mixture"]: r.config["mixture_shares"] for r in runs}
    assert shares["balanced"]["bridge_orig"] == pytest.approx(0.8)
    assert shares["temperature"]["bridge_orig"] == pytest.approx(400 ** 0.43 / (400 ** 0.43 + 100 ** 0.43))
    assert shares["bridge_heavy"]["bridge_orig"] == pytest.approx(0.75)
    assert sorted(r.env["SEED"] for r in runs if r.config["mixture"] == "balanced") == ["0", "1", "2"]


# ----------------------------------------------------------------------------------------------
# End to end on CPU: the tiny model, two data fractions, real training with validation, the closed loop on the
# CPU simulator (robosuite Lift through vla-eval), the reports: the study in one command.


def _trainer_has_val_data() -> bool:
    return "vla_val_data" in (ROOT / "llava_vla_plugin/train/arguments.py").read_text()


@requires_upstream
@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    """`mixture_compare RUNS --spec SPEC --launch` trains both runs, evaluates each closed loop (Lift, 1 episode of 2
    steps), writes the report with success and Wilson intervals; rerun, it trains and evaluates nothing; a run
    whose report is gone gets it back from its kept vla-eval results without running the simulator again."""
    from llava_vla_plugin.apps.sim_lift import check_render

    check_render()  # RenderUnavailableError names MUJOCO_GL and the Debian packages
    if not _trainer_has_val_data():
        pytest.skip("the trainer has no validation yet (no `vla_val_data` in llava_vla_plugin/train/arguments.py): "
                    "runs would not write final_metrics.json / val metrics")
    from llava_vla_plugin.apps.tiny_model import build_tiny_model
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    tiny = build_tiny_model(tmp_path / "tiny", vision_layers=1)
    converted = tmp_path / "converted"
    table = [[-0.8] * 6 + [0.0], [0.0] * 6 + [1.0], [0.8] * 6 + [0.0]]
    for split, n, seed in (("val", 6, 2), ("train", 16, 1)):  # train last: its statistics stay
        write_vla_dataset(converted, "colours", n, split=split, seed=seed, image_fn=lambda i, r: colour_image(r, i % 3),
                          action_fn=lambda i, r: table[i % 3])
    spec = {
        "name": "e2e", "converted": str(converted), "val_data": "auto",
        "env": {**tiny.env(), "NUM_GPUS": 0, "BATCH_SIZE": 2, "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": 0,
                "MODEL_MAX_LENGTH": 1024, "EVAL_STEPS": 2, "SAVE_STEPS": 1000, "LR": 1e-3, "VLA_PYTHON": sys.executable},
        "args": ["--gradient_checkpointing", "False", "--warmup_ratio", "0", "--lr_scheduler_type", "constant",
                 "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model", "--seed", "0"],
        "grid": {"fraction": [0.5, 1.0], "mixture": [{"name": "colours", "weights": {"colours": 1}}],
                 "model": [{"name": "tiny", "path": str(tiny.llava_dir), "vision_tower": tiny.vision_tower}], "steps": 3},
        # the CPU simulator: 1 episode of 2 steps per run, no video (the loop, not the skill, is under test)
        "closed_loop": {"benchmarks": ["lift"], "episodes": 1, "max_steps": 2, "params": {"max_steps": 2},
                        "vla_eval_args": ["--no-record-video"], "env": {"MUJOCO_GL": "egl"}},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    runs = tmp_path / "runs"
    env = subprocess_env()
    env.pop("FINETUNE_SCRIPT", None)
    study = [sys.executable, "-m", "llava_vla_plugin.experiments.mixture_compare", str(runs), "--spec", str(spec_path),
             "--launch", "--by", "fraction", "--out", str(runs / "compare")]
    p = subprocess.run([*study, "--dry-run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and not runs.exists(), p.stderr
    assert p.stderr.count("would serve: ") == 2 and p.stderr.count("would run:   ") == 2, p.stderr
    p = subprocess.run(study, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    names = ["frac0.5-mix_colours-steps3-model_tiny", "frac1-mix_colours-steps3-model_tiny"]
    logs = "".join((runs / n / f).read_text()[-3000:] for n in names
                   for f in ("train.log", "closed_loop/server_lift.log", "closed_loop/vla_eval_lift.log") if (runs / n / f).exists())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:] + logs
    for name in names:  # each run: its closed-loop report, from vla-eval's results of the served checkpoint
        report = json.loads((runs / name / "closed_loop/report.json").read_text())
        lift = report["suites"]["lift"]
        assert lift["trials"] == 1 and lift["successes"] in (0, 1) and report["label"] == name, report
        assert json.loads((runs / name / "closed_loop/results/lift/lift_aggregate.json").read_text())["tasks"][0]["episodes"][0]["steps"] == 2
        assert f"[closed-loop] {name}: lift 0/1 (Wilson 95 % 0.0-79.3 %)" in p.stderr or lift["successes"] == 1, p.stderr
    for name, frames in zip(names, (8, 16)):
        final = json.loads((runs / name / "out/final_metrics.json").read_text())
        assert final["step"] == 3 and final["train_frames"] == frames
        for key in ("val_action_loss", "val_action_accuracy_teacher_forced", "val_action_l1", "train_tokens_seen", "compute_flops"):
            assert isinstance(final[key], (int, float)), (key, final)
        evals = [json.loads(l) for l in (runs / name / "out/vla_metrics.jsonl").read_text().splitlines() if l.strip()]
        assert evals and all("val_action_loss" in e for e in evals)
    report = runs / "report"
    p = subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.scaling", str(runs), "--x", "frames", "--report", str(report)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads((report / "scaling.json").read_text())
    assert result["n_points"] == 2 and result["groups"][0]["fit"] is None and "need at least 3" in p.stdout
    assert (report / "scaling.png").stat().st_size > 0 and len((report / "scaling.csv").read_text().splitlines()) == 3
    # the comparison report of the one command read the same real runs (per-dataset validation and closed-loop
    # success), here compared by fraction
    compare = json.loads((runs / "compare/mixture_compare.json").read_text())
    entries = compare["sets"][0]["entries"]
    assert [e["fraction"] for e in entries] == ["0.5", "1.0"] and all("colours" in e["datasets"] for e in entries)
    for e, name in zip(entries, names):
        final = json.loads((runs / name / "out/final_metrics.json").read_text())
        assert e["datasets"]["colours"]["accuracy"] == final["val_colours_action_accuracy_teacher_forced_constrained"]
        assert e["datasets"]["colours"]["tokens"] == final["val_colours_action_tokens"] == 6 * 7
        lift = e["closed_loop"]["lift"]
        assert lift["trials"] == 1 and lift["wilson95"] == pytest.approx(list(wilson_interval(lift["successes"], 1)))
    md = (runs / "compare/mixture_compare.md").read_text()
    assert "| fraction | lift success % (Wilson 95 %) |" in md and "/1; " in md, md
    assert (runs / "compare/mixture_compare.png").stat().st_size > 0
    # the same command again trains nothing and evaluates nothing (resumable)
    reports = {n: (runs / n / "closed_loop/report.json").stat().st_mtime_ns for n in names}
    p = subprocess.run(study, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "nothing to run" in p.stderr, p.stderr
    assert all(f"[closed-loop] skipped (report exists): {n}" in p.stderr for n in names), p.stderr
    assert reports == {n: (runs / n / "closed_loop/report.json").stat().st_mtime_ns for n in names}
    # a run whose report is gone (killed before writing it) gets it back from its finished benchmarks' results
    (runs / names[0] / "closed_loop/report.json").unlink()
    p = subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.sweep", str(spec_path), "-o", str(runs),
                        "--closed-loop"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and f"{names[0]}: lift kept (done before)" in p.stderr and "serving" not in p.stderr, p.stderr
    assert json.loads((runs / names[0] / "closed_loop/report.json").read_text())["suites"]["lift"]["trials"] == 1


def test_weighting_rule_per_sweep_and_per_mixture(tmp_path):
    """The sweep plans with the mixture tool's one share formula: its default is OpenVLA's balanced rule; a
    sweep-wide `weighting` and a mixture entry's own rule (temperature with alpha) reach plan_mixture, and a bad
    rule is an error naming the spec."""
    converted = _write_converted(tmp_path / "converted")  # bridge 400, fractal 100 transitions
    base = {"converted": str(converted), "grid": {"fraction": [1.0], "model": ["m"], "steps": 1, "mixture": [
        {"name": "flat", "weights": {"bridge_orig": 1, "fractal20220817_data": 1}, "weighting": "temperature", "alpha": 0},
        {"name": "default", "weights": {"bridge_orig": 1, "fractal20220817_data": 1}}]}}

    def shares(spec):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump(spec))
        runs, _ = plan_sweep(load_spec(path), tmp_path / "runs")
        return {r.config["mixture"]: (r.config["weighting"], r.config["mixture_shares"]) for r in runs}

    got = shares(base)
    assert got["flat"] == ("temperature", pytest.approx({"bridge_orig": 0.5, "fractal20220817_data": 0.5}))
    assert got["default"] == ("balanced", pytest.approx({"bridge_orig": 0.8, "fractal20220817_data": 0.2}))
    got = shares({**base, "weighting": "weights"})
    assert got["default"] == ("weights", pytest.approx({"bridge_orig": 0.5, "fractal20220817_data": 0.5}))
    assert got["flat"][0] == "temperature"  # the entry's own rule wins
    got = shares({**base, "weighting": "temperature", "alpha": 1.0})
    assert got["default"] == ("temperature", pytest.approx({"bridge_orig": 0.8, "fractal20220817_data": 0.2}))
    with pytest.raises(SweepError, match="unknown weighting 'bogus'"):
        shares({**base, "weighting": "bogus"})


def test_train_seed_axis_repeats_runs_on_the_same_frames(sweep):
    """grid.train_seed: one run per seed (SEED in its launcher, train_seed in config.json, -seedN in its name), the
    same mixture plan (the data seed stays the spec's `seed`); SEED set elsewhere is refused."""
    spec_path, runs, env, _ = sweep
    spec = yaml.safe_load(spec_path.read_text())
    spec["grid"].update(fraction=[0.5], mixture=[{"name": "b", "weights": {"bridge_orig": 1}}], train_seed=[0, 1])
    with pytest.raises(SweepError, match="--seed from args"):  # the fixture's args pass --seed 0
        plan_sweep(spec, runs)
    spec["args"] = []
    planned, _ = plan_sweep(spec, runs)
    assert [r.name for r in planned] == [f"frac0.5-mix_b-steps3-model_tiny-seed{i}" for i in (0, 1)]
    assert [r.env["SEED"] for r in planned] == ["0", "1"] and [r.config["train_seed"] for r in planned] == [0, 1]
    assert planned[0].config["mixture_shares"] == planned[1].config["mixture_shares"]
    assert "--vla_data_seed" in planned[0].args and planned[0].args == planned[1].args
    with pytest.raises(SweepError, match="drop SEED"):
        plan_sweep({**spec, "env": {**spec["env"], "SEED": 3}}, runs.parent / "bad")
    with pytest.raises(SweepError, match="non-negative integer"):
        plan_sweep({**spec, "grid": {**spec["grid"], "train_seed": ["x"]}}, runs.parent / "bad")


# ----------------------------------------------------------------------------------------------
# The closed-loop step (experiments/closed_loop_study.py): the checked section, the dry run, skipped reports,
# changed settings refused, a failed run reported while the others go on. The real loop: test_tiny_sweep_end_to_end.


def _with_closed_loop(spec_path: Path, closed_loop: dict) -> None:
    spec = yaml.safe_load(spec_path.read_text())
    spec["closed_loop"] = closed_loop
    spec_path.write_text(yaml.safe_dump(spec))


def test_closed_loop_section_errors(sweep, tmp_path):
    spec_path, runs, _, _ = sweep
    spec = load_spec(spec_path)
    ok = {"benchmarks": ["lift"], "unnorm_key": "bridge_orig"}
    _, info = plan_sweep({**spec, "closed_loop": ok}, runs)
    bench = info["closed_loop"]["benchmarks"][0]
    assert bench["config"] == str(ROOT / "configs/vla_eval/lift.yaml") and bench["benchmark_names"] == ["lift"]
    _, info = plan_sweep(spec, runs)
    assert "closed_loop" not in info  # sweep.json of a spec without the section is as before
    foreign = tmp_path / "foreign.yaml"
    foreign.write_text(yaml.safe_dump({"benchmarks": [{"benchmark": "x.y:Z", "name": "my_task"}]}))
    cases = [
        ({"benchmarks": ["lift"]}, r"closed_loop.benchmarks\[0\] \(lift\): run frac0.25-mix_two-steps3-model_tiny trains "
                                   r"on 2 datasets .* set closed_loop.unnorm_key"),
        ({**ok, "episods": 2}, r"closed_loop: unknown key\(s\) \['episods'\]"),
        ({"unnorm_key": "x"}, "closed_loop.benchmarks: give one or more vla-eval configs"),
        ({**ok, "benchmarks": ["nope"]}, r"closed_loop.benchmarks\[0\].config: no file nope .*shipped: .*lift"),
        ({**ok, "benchmarks": [str(foreign)]}, r"\['my_task'\] match no suite of .*published.yaml"),
        ({**ok, "benchmarks": [{"config": "lift", "unnorm": "x"}]}, r"closed_loop.benchmarks\[0\]: unknown key"),
        ({**ok, "benchmarks": ["lift", "lift"]}, r"\['lift'\] twice"),
        ({**ok, "episodes": 0}, "closed_loop.episodes must be a positive integer"),
        ({**ok, "server_args": ["--port", "9"]}, r"closed_loop.server_args may not set \['--port'\]"),
        ({**ok, "docker": "no"}, "closed_loop.docker must be true or false"),
    ]
    for cl, message in cases:
        with pytest.raises(SweepError, match=message) as e:
            plan_sweep({**spec, "closed_loop": cl}, runs)
        assert str(e.value).startswith(str(spec_path.resolve())), e.value  # the message names the file


def test_closed_loop_dry_run_skip_refuse_and_failure(sweep):
    spec_path, runs, env, calls = sweep
    _with_closed_loop(spec_path, {"benchmarks": ["lift"], "episodes": 1, "max_steps": 2, "unnorm_key": "bridge_orig"})
    p = _sweep(spec_path, "-o", runs, "--launch", "--dry-run", env=env)
    assert p.returncode == 0 and not runs.exists(), p.stderr
    for n in EXPECTED:  # the training, then per run the server and the vla-eval commands, with the port to be picked
        assert f"would run: bash {runs / n / 'launch.sh'}" in p.stderr
        assert f"vla_eval_server --checkpoint {runs / n / 'out'} --unnorm-key bridge_orig --port PORT" in p.stderr
        assert (f"vla_eval.cli.main run -c {ROOT / 'configs/vla_eval/lift.yaml'} --no-docker --server-url ws://127.0.0.1:PORT "
                f"--output-dir {runs / n / 'closed_loop/results/lift'} --benchmark-field episodes_per_task=1 "
                "--benchmark-field max_steps=2") in p.stderr
        assert f"would write: {runs / n / 'closed_loop/report.json'}" in p.stderr
    p = _sweep(spec_path, "-o", runs, "--print", env=env)
    assert p.returncode == 0 and f"--out {runs} --closed-loop" in p.stderr

    # three runs already have a report; the fourth is trained by the stub: no checkpoint, so its server fails
    for n in EXPECTED[:3]:
        (runs / n / "closed_loop").mkdir(parents=True)
        (runs / n / "closed_loop/report.json").write_text("{}")
    p = _sweep(spec_path, "-o", runs, "--launch", env=env)
    assert p.returncode == 1, p.stderr
    assert all(f"[closed-loop] skipped (report exists): {n}" in p.stderr for n in EXPECTED[:3])
    assert f"[closed-loop] FAILED: {EXPECTED[3]}: the server exited" in p.stderr and "not a checkpoint directory" in p.stderr
    assert "evaluated 0, skipped 3, not trained 0, failed 1" in p.stderr
    failed = runs / EXPECTED[3] / "closed_loop"
    assert not (failed / "report.json").exists() and not (failed / "results/lift").exists()
    assert json.loads((failed / "settings.json").read_text())["checkpoint"] == str(runs / EXPECTED[3] / "out")

    # a changed section is refused for the run evaluated with the old one, before anything runs
    _with_closed_loop(spec_path, {"benchmarks": ["lift"], "episodes": 3, "unnorm_key": "bridge_orig"})
    p = _sweep(spec_path, "-o", runs, "--closed-loop", env=env)
    assert p.returncode == 2 and f"run {EXPECTED[3]} was evaluated closed loop with other settings (differs in: benchmarks" in p.stderr
    spec = yaml.safe_load(spec_path.read_text())
    del spec["closed_loop"]
    spec_path.write_text(yaml.safe_dump(spec))
    p = _sweep(spec_path, "-o", runs, "--closed-loop", env=env)
    assert p.returncode == 2 and "--closed-loop needs a `closed_loop:` section" in p.stderr


def test_study_command_flags(tmp_path):
    """mixture_compare's one-command form takes --spec and --launch together, and one RUNS folder."""
    from llava_vla_plugin.experiments.mixture_compare import main

    for argv in (["runs", "--launch"], ["runs", "--spec", "s.yaml"], ["runs", "--dry-run"],
                 ["a", "b", "--spec", "s.yaml", "--launch"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2, argv
