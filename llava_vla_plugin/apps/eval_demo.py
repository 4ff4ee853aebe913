"""The closed loop on a CPU, end to end (`make eval-demo`):

  1. record scripted grasp-and-lift demonstrations in robosuite Lift (sim_lift's controller): the agentview
     and wrist (eye-in-hand) cameras and the 8-d robot state
  2. write them as RLDS (a small LIBERO-like schema, tfds' serializer via testing.rlds_fixture)
  3. convert with data_tools.convert (registry entry: configs/registry/lift_scripted.yaml; it keeps the wrist
     view and the state)
  4. train the tiny llava_qwen model with scripts/finetune_ov_vla.sh (NUM_GPUS=0, CAMERAS=primary,wrist PROPRIO=1)
  5. serve it (python -m llava_vla_plugin.infer.vla_eval_server) and run vla-eval on Lift (--no-docker), the
     benchmark sending the wrist view and the state (send_wrist_image, send_state)
  6. print the success table and the videos

    python -m llava_vla_plugin.apps.eval_demo [--workdir eval_demo_out] [--episodes 6] [--train-steps 60]
    python -m llava_vla_plugin.apps.eval_demo --cameras primary --no-proprio     # the third-person view alone

Be clear about what this shows: the loop (data -> model -> closed-loop success, videos), not a
skill. A tiny random-init model trained for minutes on a handful of demonstrations on a CPU
succeeds rarely or never; 0 % is the expected result. The same commands with a real base model,
more demonstrations and a GPU are how a real Lift (or LIBERO) number is produced.

Why record in-process rather than through vla-eval: vla-eval's recorder keeps videos and per-step
rows, not the observation dicts RLDS needs; the demonstrations are the scripted controller driving
the same environment (sim_lift.make_lift_env), with the same image transform (sim_lift.env_image, the
180-degree rotation, on both cameras) and the same state (sim_lift.lift_state) that LiftBenchmark sends the
model, so training inputs and evaluation inputs match.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from llava_vla_plugin.infer.vla_eval_run import (ClosedLoopRunError, checkpoint_server_args, run_logged, serving,
                                                vla_eval_command)

ROOT = Path(__file__).resolve().parents[2]
DATASET = "lift_scripted"
REGISTRY_FILE = ROOT / "configs" / "registry" / "lift_scripted.yaml"
EVAL_CONFIG = ROOT / "configs" / "vla_eval" / "lift.yaml"
DEMO_SEED_OFFSET = 1000  # demonstrations use placements seed 1000+i; evaluation uses the benchmark's 0, 1, ...
N_STAGES = 6


def stage(n: int, title: str) -> float:
    print(f"\n[{n}/{N_STAGES}] {title}", flush=True)
    return time.perf_counter()


def done(t0: float, msg: str) -> None:
    print(f"      {msg}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def run(cmd: list[str], env: dict[str, str], log: Path, timeout: float | None = None) -> None:
    try:
        run_logged(cmd, env, log, timeout)
    except ClosedLoopRunError as e:
        raise SystemExit(f"eval-demo: {e}") from None


# ---- 1-2: demonstrations as RLDS ---------------------------------------------------------------
def libero_like_features(resolution: int, full: bool = False, wrist: bool = False):
    """OpenVLA's modified LIBERO RLDS schema (image, wrist_image, 8-d state, 7-d joint_state, 7-d action).

    full=True is all of it. The eval demo writes wrist=True (image, wrist_image, state): nothing reads
    joint_state; with --cameras primary it writes neither (the wrist camera is then not rendered: a second
    camera doubles the simulator's rendering cost)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    image = lambda: f.Image(shape=(resolution, resolution, 3), dtype=np.uint8, encoding_format="jpeg")  # noqa: E731
    observation = {"image": image(), "state": f.Tensor(shape=(8,), dtype=np.float32)}
    if full or wrist:
        observation["wrist_image"] = image()
    if full:
        observation["joint_state"] = f.Tensor(shape=(7,), dtype=np.float32)
    return f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict(observation),
            "action": f.Tensor(shape=(7,), dtype=np.float32),
            "discount": f.Scalar(dtype=np.float32),
            "reward": f.Scalar(dtype=np.float32),
            "is_first": f.Scalar(dtype=np.bool_),
            "is_last": f.Scalar(dtype=np.bool_),
            "is_terminal": f.Scalar(dtype=np.bool_),
            "language_instruction": f.Text(),
        }),
        "episode_metadata": f.FeaturesDict({"file_path": f.Text()}),
    })


def _jpeg(frame: np.ndarray) -> bytes:
    """Stored as JPEG q95 bytes: what convert copies and the server's round trip matches."""
    from data_tools.images import JPEG_QUALITY
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def record_demos(episodes: int, steps: int, resolution: int, wrist: bool = True) -> tuple[list[list[dict]], list[bool]]:
    """Drive Lift with the scripted controller for `steps` steps per episode (fixed length: the
    RLDS writer draws one length per dataset); a lifted cube keeps being held up after success.
    Each step keeps the agentview frame, the wrist (eye-in-hand) frame when `wrist` (both through
    sim_lift.env_image, as LiftBenchmark sends them) and the 8-d state (sim_lift.lift_state, LiftBenchmark's
    `states`): the demonstrations hold what the benchmark sends with send_wrist_image / send_state."""
    from llava_vla_plugin.apps.sim_lift import (INSTRUCTION, WRIST_CAMERA, check_render, discretise_gripper, env_image,
                                           lift_state, make_lift_env, scripted_lift_action)

    check_render()
    env = make_lift_env(seed=DEMO_SEED_OFFSET, resolution=resolution, wrist=wrist)
    demos, successes = [], []
    try:
        for ep in range(episodes):
            np.random.seed(DEMO_SEED_OFFSET + ep)  # robosuite 1.4 places the cube with numpy's global generator
            obs, state, rows, success = env.reset(), {}, [], False
            for _ in range(steps):
                action = discretise_gripper(scripted_lift_action(obs["robot0_eef_pos"], obs["cube_pos"], state))
                observation = {"image": _jpeg(env_image(obs["agentview_image"])), "state": lift_state(obs)}
                if wrist:
                    observation["wrist_image"] = _jpeg(env_image(obs[f"{WRIST_CAMERA}_image"]))
                obs, _, _, _ = env.step(action)
                success = success or bool(env._check_success())
                rows.append({"observation": observation,
                             "action": action.astype(np.float32), "reward": np.float32(success),
                             "language_instruction": INSTRUCTION})
            demos.append(rows)
            successes.append(success)
            print(f"      demo {ep + 1}/{episodes}: {steps} steps, lifted={success}", flush=True)
    finally:
        env.close()
    return demos, successes


def write_demos_rlds(root: Path, demos: list[list[dict]], resolution: int, wrist: bool = True) -> Path:
    from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

    schema_dir = root / "_schema" / DATASET
    schema_dir.mkdir(parents=True, exist_ok=True)
    libero_like_features(resolution, wrist=wrist).save_config(str(schema_dir))
    steps = len(demos[0])
    path = write_rlds_dataset(root, DATASET, "1.0.0", schema=schema_dir, splits={"train": len(demos)}, steps=steps,
                              step_fn=lambda ep, t, rng: demos[ep][t])
    shutil.rmtree(root / "_schema")
    return path


# ---- 5: serving and vla-eval: infer/vla_eval_run.py (shared with the study's closed-loop step) -------
def success_table(aggregate: dict) -> list[str]:
    """One row per task and an overall row from vla-eval's <name>_aggregate.json."""
    lines = ["| task | episodes | successes | success rate |", "|---|---|---|---|"]
    total = wins = 0
    for task in aggregate.get("tasks", []):
        eps = task.get("episodes", [])
        k = sum(bool(e.get("metrics", {}).get("success")) for e in eps)
        lines.append(f"| {task.get('task', task.get('name', '?'))} | {len(eps)} | {k} | {k / max(len(eps), 1):.0%} |")
        total, wins = total + len(eps), wins + k
    lines.append(f"| **all** | {total} | {wins} | {wins / max(total, 1):.0%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_vla_plugin.apps.eval_demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="eval_demo_out", help="folder for everything the demo writes (replaced)")
    ap.add_argument("--episodes", type=int, default=6, help="scripted demonstrations to record (default 6)")
    ap.add_argument("--demo-steps", type=int, default=40, help="steps per demonstration (default 40; the scripted "
                    "controller lifts the cube in about 30)")
    ap.add_argument("--train-steps", type=int, default=60, help="training steps (default 60)")
    ap.add_argument("--eval-episodes", type=int, default=2, help="closed-loop episodes (default 2)")
    ap.add_argument("--eval-max-steps", type=int, default=60, help="step limit per closed-loop episode (default 60)")
    ap.add_argument("--resolution", type=int, default=256, help="agentview size, as LIBERO (default 256)")
    ap.add_argument("--cameras", default="primary,wrist", help="views recorded, trained on (the launcher's CAMERAS) "
                    "and sent by the benchmark (send_wrist_image): primary,wrist (default: agentview + the eye-in-hand "
                    "camera) or primary (agentview alone; the wrist camera is then not rendered)")
    ap.add_argument("--proprio", action=argparse.BooleanOptionalAction, default=True, help="train with the 8-d robot "
                    "state in the prompt (the launcher's PROPRIO=1) and have the benchmark send it (send_state); "
                    "--no-proprio: without it (default: with)")
    ap.add_argument("--trace", action="store_true", help="save every closed-loop step as .npz: what the env rendered "
                    "and sent (WORKDIR/trace/env) and what the server got and answered (WORKDIR/trace/server)")
    ap.add_argument("--tiny-model", default=None, help="reuse a tiny model built by "
                    "`python -m llava_vla_plugin.apps.tiny_model DIR` (default: build one in the workdir)")
    args = ap.parse_args(argv)
    from llava_vla_plugin.core.inputs import InputConfigError, parse_cameras

    try:
        cameras = parse_cameras(args.cameras)
    except InputConfigError as e:
        ap.error(f"--cameras: {e}")
    wrist = "wrist" in cameras
    for name in ("episodes", "demo_steps", "train_steps", "eval_episodes", "eval_max_steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides the stage output
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.perf_counter()
    print("eval-demo: the closed loop on a CPU. A tiny model trained for minutes succeeds rarely or never;\n"
          "           the loop (demonstrations -> RLDS -> convert -> train -> vla-eval -> success, video) is the point.")

    views = "agentview + wrist cameras" if wrist else "agentview camera"
    t0 = stage(1, f"recording {args.episodes} scripted Lift demonstrations ({args.demo_steps} steps each, {views} and "
               "the 8-d state, MuJoCo on EGL)")
    # A child process: importing TensorFlow (stage 2) into a process that has loaded robosuite/MuJoCo's
    # libraries crashes it (segfault in TF's import, seen with tensorflow 2.x + mujoco 3.3.7 + numba).
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        demos, lifted = pool.apply(record_demos, (args.episodes, args.demo_steps, args.resolution, wrist))
    done(t0, f"{sum(lifted)}/{len(lifted)} demonstrations lifted the cube")

    t0 = stage(2, "writing them as RLDS (LIBERO-like schema)")
    rlds = work / "rlds"
    path = write_demos_rlds(rlds, demos, args.resolution, wrist)
    done(t0, f"{path}")

    t0 = stage(3, "converting to LLaVA JSON (data_tools.convert --registry configs/registry/lift_scripted.yaml)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MUJOCO_GL": "egl"}
    converted = work / "converted"
    run([sys.executable, "-m", "data_tools.convert", "--data-dir", str(rlds), "--datasets", DATASET,
         "--registry", str(REGISTRY_FILE), "--out", str(converted), "--no-progress"], env, work / "convert.log")
    n_train = sum(1 for _ in (converted / DATASET / "train.jsonl").open())
    n_val = sum(1 for _ in (converted / DATASET / "val.jsonl").open()) if (converted / DATASET / "val.jsonl").exists() else 0
    done(t0, f"{n_train} train / {n_val} val frames -> {converted}")

    inputs_env = {"CAMERAS": ",".join(cameras), "PROPRIO": "1" if args.proprio else "0"}
    t0 = stage(4, f"training the tiny model {args.train_steps} steps on CPU (scripts/finetune_ov_vla.sh, NUM_GPUS=0, "
               f"CAMERAS={inputs_env['CAMERAS']} PROPRIO={inputs_env['PROPRIO']})")
    from llava_vla_plugin.apps.tiny_model import demo_tiny_model

    tiny = demo_tiny_model(args.tiny_model, work, "eval-demo")
    run_dir = work / "run"
    train_env = {**env, **tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
                 "DATA": str(converted / "mixture.yaml"), "IMAGE_FOLDER": str(converted), "OUTPUT_DIR": str(run_dir),
                 "NUM_GPUS": "0", "BATCH_SIZE": "4", "MAX_STEPS": str(args.train_steps),
                 "SAVE_STEPS": str(args.train_steps), "LR": "1e-2", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
                 "MODEL_MAX_LENGTH": "2048", "VLA_PYTHON": sys.executable, **inputs_env}
    run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--gradient_checkpointing", "False", "--warmup_ratio", "0",
         "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"], train_env, work / "train.log")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    if losses:
        print(f"      training loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f} (last step's action-token accuracy, "
              f"teacher-forced: {losses[-1].get('action_accuracy_teacher_forced', float('nan')):.2f}; a training "
              "diagnostic: the number that counts here is stage 6's closed-loop success rate)")
    done(t0, f"checkpoint {run_dir}")

    sent = [n for n, on in (("the wrist view", wrist), ("the state", args.proprio)) if on]
    t0 = stage(5, f"closed loop: {args.eval_episodes} Lift episodes of at most {args.eval_max_steps} steps through vla-eval"
               + (f", the benchmark sending {' and '.join(sent)}" if sent else ""))
    server_log, results = work / "server.log", work / "eval"
    # the benchmark's LIBERO parameters say what each observation holds; the server's --wrist-key / --state-key
    # defaults (wrist, states) are the keys LiftBenchmark sends them under, as vla-eval's LIBERO does
    eval_params = {"max_steps": args.eval_max_steps, "send_wrist_image": wrist, "send_state": args.proprio}
    server_extra: list[str] = []
    if args.trace:
        eval_params["trace_dir"] = str(work / "trace" / "env")
        server_extra = ["--trace-dir", str(work / "trace" / "server")]
    try:
        with serving(checkpoint_server_args(run_dir, DATASET, server_extra), train_env, server_log) as port:
            run(vla_eval_command(EVAL_CONFIG, port, results, episodes=args.eval_episodes, max_steps=args.eval_max_steps,
                                 params=eval_params), train_env, work / "eval.log")
    except ClosedLoopRunError as e:
        raise SystemExit(f"eval-demo: {e}") from None
    done(t0, f"vla-eval results -> {results}")

    stage(6, "results")
    aggregate_file = results / "lift_aggregate.json"
    aggregate = json.loads(aggregate_file.read_text())
    print("\n".join("      " + line for line in success_table(aggregate)))
    videos = sorted((results / "episodes" / "lift").glob("*.mp4"))
    for v in videos:
        print(f"      video: {v}")
    summary = {"demonstrations": len(demos), "demonstrations_lifted": sum(lifted), "train_frames": n_train,
               "train_steps": args.train_steps, "aggregate": str(aggregate_file), "videos": [str(v) for v in videos],
               "checkpoint": str(run_dir), "cameras": list(cameras), "proprio": args.proprio}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\neval-demo finished in {time.perf_counter() - started:.0f} s; everything is under {work}")
    from llava_vla_plugin.apps.demo import print_next, tiny_env_prefix

    q, py = shlex.quote, shlex.quote(sys.executable)
    limits = (f"--benchmark-field episodes_per_task={args.eval_episodes} --benchmark-field max_steps={args.eval_max_steps} "
              f"--param max_steps={args.eval_max_steps}")
    # the config sends the wrist view and the state; a run without them need not render the wrist camera
    inputs_off = "".join(f"--param {k}=false " for k, on in (("send_wrist_image", wrist), ("send_state", args.proprio))
                         if not on)
    print_next([
        ("serve it yourself (vla-eval's protocol on ws://127.0.0.1:8000, the config's address; Ctrl-C stops it)",
         f"{tiny_env_prefix(tiny.hf_home)} {py} -m llava_vla_plugin.infer.vla_eval_server --checkpoint {q(str(run_dir))} "
         f"--unnorm-key {DATASET}"),
        ("then, in a second shell, the closed loop of stage 5 against it (vla-eval; drop the last three options for "
         "the config's 2 x 60 steps)",
         f"MUJOCO_GL=egl {py} -m vla_eval.cli.main run -c {q(str(EVAL_CONFIG))} --no-docker "
         f"--output-dir {q(str(work / 'eval2'))} {inputs_off}{limits}"),
        ("a report of the results: success with confidence intervals, failure reasons",
         f"{py} -m llava_vla_plugin.experiments.closed_loop_report {q(str(results))} --out {q(str(work / 'report'))}"),
        ("more demonstrations and steps (hours on a CPU; a GPU helps), into a new folder",
         f"MUJOCO_GL=egl {py} -m llava_vla_plugin.apps.eval_demo --workdir {q(str(work.parent / (work.name + '_more')))} "
         f"--episodes 50 --train-steps 2000{'' if wrist else ' --cameras primary'}{'' if args.proprio else ' --no-proprio'}"),
        ("the real thing: the LIBERO recipe in README.md (configs/vla_eval/libero_*.yaml)", None),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
