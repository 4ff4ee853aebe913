"""Closed-loop speed on this machine: server latency and Lift episodes per hour, tiny model vs a baseline.

    python bench/bench_closed_loop.py [--checkpoint eval_demo_out/run] [--calls 20] [--episodes 2] [--steps 20]

Baseline, measured in the same run: the scripted grasp-and-lift server (sim_lift.ScriptedLiftServer), which
answers through the same vla-eval protocol with no model, so (tiny - scripted) is the model's cost.
  1. latency: vla-eval's own serve_async + Connection on loopback, one 256x256 agentview frame per call
     (what LiftBenchmark sends); median and p90 round trip; for the model server also the predict() time.
  2. episodes/hour: `vla-eval run --no-docker` of configs/vla_eval/lift.yaml against each server as a
     subprocess, fixed-length episodes (--steps; the scripted controller would stop at success after ~29),
     from vla-eval's own per-episode elapsed_sec.
The checkpoint defaults to the one `make eval-demo` trains (eval_demo_out/run).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _latency(server, observations) -> list[float]:
    import anyio
    from vla_eval.connection import Connection
    from vla_eval.model_servers.serve import serve_async

    times: list[float] = []

    async def run():
        async with anyio.create_task_group() as tg:
            port = await tg.start(serve_async, server, "127.0.0.1", 0)
            conn = Connection(f"ws://127.0.0.1:{port}", timeout=120)
            await conn.connect()
            await conn.start_episode({"task": {"name": "lift the red cube"}})
            for obs in observations:
                t0 = time.perf_counter()
                await conn.act(obs)
                times.append(time.perf_counter() - t0)
            await conn.end_episode({})
            await conn.close()
            tg.cancel_scope.cancel()

    anyio.run(run)
    return times[1:]  # the first call pays one-time costs (graph warm-up, allocations)


def _frame() -> np.ndarray:
    """One real rendered Lift frame, as LiftBenchmark sends it."""
    from llava_vla_plugin.apps.sim_lift import env_image, make_lift_env

    env = make_lift_env(0)
    obs = env.reset()
    frame, eef, cube = env_image(obs["agentview_image"]), obs["robot0_eef_pos"], obs["cube_pos"]
    env.close()
    return frame, eef.astype(np.float32), cube.astype(np.float32)


def _episodes(server_cmd: list[str], env: dict, episodes: int, steps: int, out: Path) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (out / "server.log").open("w")
    proc = subprocess.Popen([*server_cmd, "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 600:
                    raise SystemExit(f"server did not start; see {out / 'server.log'}")
                time.sleep(0.5)
        res = subprocess.run([sys.executable, "-m", "vla_eval.cli.main", "run", "-c", "configs/vla_eval/lift.yaml",
                              "--no-docker", "--server-url", f"ws://127.0.0.1:{port}", "--output-dir", str(out),
                              "--benchmark-field", f"episodes_per_task={episodes}", "--benchmark-field",
                              f"max_steps={steps}", "--param", f"max_steps={steps}"], env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"vla-eval failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    agg = json.loads((out / "lift_aggregate.json").read_text())
    return agg["tasks"][0]["episodes"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "eval_demo_out" / "run"), help="a tiny checkpoint (make eval-demo)")
    ap.add_argument("--tiny-model", default=None, help="the tiny model folder the checkpoint's tower lives in "
                    "(default: <checkpoint>/../tiny_model)")
    ap.add_argument("--unnorm-key", default="lift_scripted")
    ap.add_argument("--calls", type=int, default=20, help="latency calls per server (default 20)")
    ap.add_argument("--episodes", type=int, default=2, help="Lift episodes per server (default 2)")
    ap.add_argument("--steps", type=int, default=20, help="steps per episode (default 20)")
    args = ap.parse_args(argv)
    ckpt = Path(args.checkpoint).resolve()
    if not (ckpt / "dataset_statistics.json").is_file():
        raise SystemExit(f"{ckpt} is not a trained checkpoint: run `make eval-demo` first or pass --checkpoint")
    tiny = Path(args.tiny_model or ckpt.parent / "tiny_model").resolve()
    os.environ.update({"HF_HOME": str(tiny / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "USE_TF": "0", "MUJOCO_GL": "egl"})
    import torch

    from llava_vla_plugin.infer.policy import VLAPolicy
    from llava_vla_plugin.apps.sim_lift import ScriptedLiftServer
    from llava_vla_plugin.infer.vla_eval_server import LlavaVLAModelServer

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"checkpoint {ckpt}", flush=True)
    frame, eef, cube = _frame()
    obs = [{"images": {"agentview": frame}, "task_description": "lift the red cube", "eef_pos": eef, "object_pos": cube}
           for _ in range(args.calls + 1)]
    scripted = _latency(ScriptedLiftServer(), obs)
    model_server = LlavaVLAModelServer(VLAPolicy.from_pretrained(str(ckpt), device="cpu"), unnorm_key=args.unnorm_key)
    model = _latency(model_server, obs)
    predict = model_server.latencies_s[1:]

    def ms(xs):
        xs = sorted(xs)
        return statistics.median(xs) * 1e3, xs[int(0.9 * (len(xs) - 1))] * 1e3

    (s50, s90), (m50, m90), (p50, _) = ms(scripted), ms(model), ms(predict)
    print(f"\nserver round trip, 256x256 frame, {len(model)} calls (median / p90 ms):")
    print(f"  scripted server (baseline, no model)  {s50:8.1f} / {s90:8.1f}")
    print(f"  tiny model server                     {m50:8.1f} / {m90:8.1f}   ({m50 / s50:.0f}x; predict() {p50:.1f} ms, "
          f"protocol + JPEG + conversions {m50 - p50:.1f} ms)")

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory(prefix="bench_closed_loop_") as tmp:
        runs = {}
        for name, cmd in (("scripted", [sys.executable, "-m", "llava_vla_plugin.apps.sim_lift", "--serve-scripted"]),
                          ("tiny", [sys.executable, "-m", "llava_vla_plugin.infer.vla_eval_server", "--checkpoint", str(ckpt),
                                    "--unnorm-key", args.unnorm_key])):
            out = Path(tmp) / name
            out.mkdir()
            eps = _episodes(cmd, env, args.episodes, args.steps, out)
            secs = [e["elapsed_sec"] for e in eps]
            runs[name] = (statistics.mean(secs), [e["steps"] for e in eps])
    print(f"\nLift episodes through vla-eval ({args.episodes} x {args.steps} steps, rendering on CPU via EGL):")
    (ss, s_steps), (ts, t_steps) = runs["scripted"], runs["tiny"]
    print(f"  scripted server (baseline)  {ss:7.1f} s/episode  {3600 / ss:6.1f} episodes/h  {ss / max(s_steps[0], 1):.2f} s/step  steps {s_steps}")
    print(f"  tiny model server           {ts:7.1f} s/episode  {3600 / ts:6.1f} episodes/h  {ts / max(t_steps[0], 1):.2f} s/step  steps {t_steps}"
          f"  ({ts / ss:.2f}x the baseline's time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
