"""Closed loop on CPU: robosuite Lift through vla-eval's own CLI, orchestrator and protocol.

Two runs share one render check and the tiny checkpoint of test_policy.py:
  * the scripted grasp-and-lift server succeeds (success detection and the 7-d action
    convention are right);
  * the tiny model served by `python -m llava_vla_plugin.infer.vla_eval_server` runs two short
    episodes; vla-eval writes its aggregate, per-episode results and one video per episode;
    the first action the env received equals the model's tokens converted by hand, and the
    image the model got equals the rendered frame after the documented transform.
Episodes are short (3 model steps; the scripted run stops at success, ~30 steps): ~1 s per
rendered step on a busy 2-core machine.
"""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, skip_unless_ci, subprocess_env
from printed_commands import Started, listening, next_commands, port_free, run_verbatim, user_env
from test_policy import trained_checkpoint

VLA_EVAL = [sys.executable, "-m", "vla_eval.cli.main"]  # the `vla-eval` console script, in this interpreter


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"server did not listen on {port} within {timeout} s")


def _run_eval(config: str, port: int, out: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    # --server-url/--output-dir: a free port and a temp dir instead of the config's 8000 / ./results
    return subprocess.run([*VLA_EVAL, "run", "-c", config, "--no-docker", "--server-url", f"ws://127.0.0.1:{port}",
                           "--output-dir", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def _serve(args: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", *args, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_port(port, proc)
    return proc, port


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def render_ok():
    from llava_vla_plugin.apps.sim_lift import check_render

    check_render()  # RenderUnavailableError names MUJOCO_GL and the Debian packages


def test_scripted_lift_succeeds(render_ok, tmp_path):
    env = subprocess_env({"MUJOCO_GL": "egl"})
    proc, port = _serve(["llava_vla_plugin.apps.sim_lift", "--serve-scripted"], env)
    try:
        res = _run_eval("configs/vla_eval/lift_scripted.yaml", port, tmp_path, env)
    finally:
        _stop(proc)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    agg = json.loads((tmp_path / "lift_scripted_aggregate.json").read_text())
    assert agg["tasks"][0]["mean_success"] == 1.0, agg["tasks"]
    assert list((tmp_path / "episodes" / "lift_scripted").glob("*_success.mp4")), agg


def test_tiny_model_closed_loop(render_ok, tiny_model, tmp_path_factory, tmp_path):
    ck = trained_checkpoint(tiny_model, tmp_path_factory)
    env = dict(ck["env"], MUJOCO_GL="egl")
    server_trace, env_trace, out = tmp_path / "server", tmp_path / "env", tmp_path / "out"
    # --unnorm-key ds_b: the checkpoint holds two datasets; ds_b's gripper is un-masked 0/1 like OXE's
    proc, port = _serve(["llava_vla_plugin.infer.vla_eval_server", "--checkpoint", str(ck["ckpt"]), "--unnorm-key", "ds_b",
                         "--trace-dir", str(server_trace)], env)
    try:
        # 3 steps per episode instead of the config's 60: the loop, not the skill, is under test
        res = _run_eval("configs/vla_eval/lift.yaml", port, out, env, "--param", "max_steps=3", "--param",
                        f"trace_dir={env_trace}", "--benchmark-field", "max_steps=3")
    finally:
        _stop(proc)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    agg = json.loads((out / "lift_aggregate.json").read_text())
    episodes = agg["tasks"][0]["episodes"]
    assert [e["steps"] for e in episodes] == [3, 3] and all(isinstance(e["metrics"]["success"], bool) for e in episodes)
    assert len(list((out / "episodes" / "lift").glob("*.jsonl"))) == 2  # per-step rows, one file per episode
    videos = sorted((out / "episodes" / "lift").glob("*.mp4"))
    assert len(videos) == 2, videos

    # the image the model got = the rendered frame, rotated 180 degrees, JPEG q95 round trip
    first = np.load(server_trace / "call00000.npz")
    frame = np.load(env_trace / "ep0_step0.npz")["frame"]
    rotated = frame[::-1, ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rotated)).save(buf, format="JPEG", quality=95)
    by_hand = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(first["obs_image"], rotated)
    assert np.array_equal(first["model_image"], by_hand)
    # lift.yaml sends the wrist view and the state too; this checkpoint (no vla_inputs.json) is served without them
    rendered = np.load(env_trace / "ep0_step0.npz")
    assert "wrist_frame" in rendered.files and rendered["state"].shape == (8,)
    assert not {"obs_wrist_image", "state"} & set(first.files), first.files

    # the first action the env received = tokens -> bin centres -> q01/q99 (mask) -> gripper, by hand
    tok = json.loads((ck["ckpt"] / "vla_action_tokenizer.json").read_text())
    stats = json.loads((ck["ckpt"] / "dataset_statistics.json").read_text())["ds_b"]["action"]
    n, lo, hi = tok.get("n_bins", 256), tok.get("low", -1.0), tok.get("high", 1.0)
    bins = first["action_ids"] - tok["first_token_id"]
    norm = lo + (bins + 0.5) * (hi - lo) / n
    q01, q99, mask = (np.array(stats[k]) for k in ("q01", "q99", "mask"))
    unnorm = np.where(mask, 0.5 * (norm + 1) * (q99 - q01) + q01, norm)
    np.testing.assert_allclose(first["model_output"], unnorm, rtol=1e-12)
    expected = unnorm.copy()
    expected[-1] = -1.0 if 2 * unnorm[-1] - 1 > 0 else 1.0  # dataset 1 = open -> robosuite -1
    received = np.load(env_trace / "ep0_step1.npz")["received"]
    np.testing.assert_allclose(received, expected, rtol=1e-6, atol=1e-7)  # float32 on the wire


def test_eval_demo_reduced(render_ok, tiny_model, tmp_path):
    """`make eval-demo` end to end (demos -> RLDS -> convert -> train -> vla-eval -> table, video), reduced:
    2 demonstrations of 4 steps, 2 training steps, 1 closed-loop episode of 2 steps, and the session's tiny
    model (--tiny-model) instead of a second build. Its default inputs: the agentview and wrist cameras and the
    8-d state are recorded, converted, trained on (CAMERAS=primary,wrist PROPRIO=1: vla_inputs.json) and sent by
    the benchmark to the server on the real loop (--trace: the env's and the server's per-step records). The defaults (6 x 40 demo steps, 60 train steps, 2 x 60
    eval steps) take about 10 minutes of CPU; `make eval-demo` runs them. Run from outside the repository, in a
    user's environment (MUJOCO_GL=egl as `make eval-demo` sets it, no HF_HOME), then its `next` commands verbatim
    from that folder (printed_commands): the server and, against it, the printed vla-eval run (stage 5's 1 x 2
    steps); the report; the larger eval-demo until it records its first demonstration (then stopped)."""
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.apps.eval_demo", "--workdir", str(work), "--episodes", "2",
                           "--demo-steps", "4", "--train-steps", "2", "--eval-episodes", "1", "--eval-max-steps", "2",
                           "--tiny-model", str(tiny_model.root), "--trace"], cwd=tmp_path,
                          env=user_env({"MUJOCO_GL": "egl"}), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeds rarely or never" in proc.stdout
    assert "| **all** | 1 |" in proc.stdout  # the success table: one episode
    summary = json.loads((work / "summary.json").read_text())
    assert [Path(v).exists() for v in summary["videos"]] == [True]
    assert str(summary["videos"][0]) in proc.stdout and str(work / "run") in proc.stdout  # absolute paths printed
    agg = json.loads(Path(summary["aggregate"]).read_text())
    assert [e["steps"] for e in agg["tasks"][0]["episodes"]] == [2]

    # the demonstrations went through the registry entry: 8 frames, LIBERO's gripper convention
    # (robosuite -1 open / +1 close -> [0 close, 1 open]); the scripted controller starts with the gripper open
    rows = [json.loads(l) for l in (work / "converted" / "lift_scripted" / "train.jsonl").open()]
    assert summary["train_frames"] == len(rows) == 8
    assert {r["action_raw"][-1] for r in rows} <= {0.0, 1.0}
    starts = [r for r in rows if r["step"] == 0]
    assert len(starts) == 2 and all(r["action_raw"][-1] == 1.0 for r in starts)
    assert all("lift the red cube" in r["conversations"][0]["value"] for r in rows)

    # the wrist view and the state went through convert (registry: wrist_image, EEF_state + gripper_state = 8-d)
    from data_tools.converted_format import PROPRIO_SOURCE_STATE, proprio_source

    ds = work / "converted" / "lift_scripted"
    assert all((work / "converted" / r["image_wrist"]).is_file() for r in rows), rows[0]
    manifest = json.loads((ds / "manifest.json").read_text())
    assert manifest["views"]["wrist"]["missing"] == 0 and manifest["proprio"]["dims"] == 8, manifest
    assert proprio_source(json.loads((ds / "dataset_statistics.json").read_text())["lift_scripted"]) == PROPRIO_SOURCE_STATE
    # ... were trained on (the checkpoint records them) ...
    assert summary["cameras"] == ["primary", "wrist"] and summary["proprio"] is True
    assert json.loads((work / "run" / "vla_inputs.json").read_text()) == {"cameras": ["primary", "wrist"], "proprio": True,
                                                                          "proprio_dim": 8}
    # ... and reached the model on the real loop: the server's first call got the env's eye-in-hand frame rotated
    # 180 degrees (the agentview's transform), its JPEG q95 round trip as the model's wrist image, and the state
    from llava_vla_plugin.apps.sim_lift import env_image
    from llava_vla_plugin.infer.vla_eval_server import jpeg_roundtrip

    calls = sorted((work / "trace" / "server").glob("call*.npz"))
    assert len(calls) == 2, calls  # one episode of 2 steps
    first, rendered = np.load(calls[0]), np.load(work / "trace" / "env" / "ep0_step0.npz")
    assert rendered["wrist_frame"].shape == (256, 256, 3) and rendered["state"].shape == (8,)
    assert np.array_equal(first["obs_wrist_image"], env_image(rendered["wrist_frame"]))
    assert np.array_equal(first["model_wrist_image"], jpeg_roundtrip(env_image(rendered["wrist_frame"])))
    assert not np.array_equal(first["obs_wrist_image"], first["obs_image"])  # two cameras, not one sent twice
    np.testing.assert_array_equal(first["state"], rendered["state"].astype(np.float64))

    # the next: commands, verbatim, from the folder the demo ran in, in a shell without MUJOCO_GL or HF_HOME
    env, log = user_env(), tmp_path / "next.log"
    commands = next_commands(proc.stdout)
    assert len(commands) == 4, commands
    (_, serve), (_, evaluate), (_, report), (_, more) = commands
    assert serve.startswith(f"HF_HOME={tiny_model.hf_home} HF_HUB_OFFLINE=1 ") and "vla_eval_server" in serve
    run_verbatim(report, tmp_path, env, log)
    assert (work / "report" / "report.md").is_file()
    more_dir = tmp_path / "demo_more"
    assert f"--workdir {more_dir} " in more
    with Started(more, tmp_path, env, log) as larger:  # 50 demonstrations: stopped once it records
        larger.wait_for(lambda: "demo 1/50" in log.read_text(), "its first demonstration", timeout=600)
    if not port_free(8000):
        skip_unless_ci("port 8000 is taken on this machine: the printed server + vla-eval commands were not run "
                       "(the report and the larger eval-demo were)")
    assert "send_wrist_image" not in evaluate  # the config sends the wrist view and the state: what the run needs
    with Started(serve, tmp_path, env, log) as server:
        server.wait_for(lambda: listening(8000), "server on port 8000", timeout=300)
        run_verbatim(evaluate, tmp_path, env, log)
    again = json.loads((work / "eval2" / "lift_aggregate.json").read_text())
    assert [e["steps"] for e in again["tasks"][0]["episodes"]] == [2]


def test_eval_demo_inputs_flags():
    """--cameras takes the launcher's CAMERAS values (the old third-person-only path: --cameras primary --no-proprio);
    a bad value stops before anything is recorded, naming the flag and the choices."""
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.apps.eval_demo", "--help"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--cameras" in proc.stdout and "--no-proprio" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "llava_vla_plugin.apps.eval_demo", "--cameras", "wrist,top",
                           "--workdir", "never_made"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "--cameras: CAMERAS=wrist,top: unknown view(s) ['top']" in proc.stderr, proc.stderr
    assert not (ROOT / "never_made").exists()
