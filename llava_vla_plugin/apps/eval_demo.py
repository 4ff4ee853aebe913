"""The closed loop on a CPU, end to end (`make eval-demo`):

  1. record scripted grasp-and-lift demonstrations in robosuite Lift (sim_lift's controller)
  2. write them as RLDS (a small LIBERO-like schema, tfds' serializer via testing.rlds_fixture)
  3. convert with data_tools.convert (registry entry: configs/registry/lift_scripted.yaml)
  4. train the tiny llava_qwen model with scripts/finetune_ov_vla.sh (NUM_GPUS=0)
  5. serve it (python -m llava_vla_plugin.infer.vla_eval_server) and run vla-eval on Lift (--no-docker)
  6. print the success table and the videos

    python -m llava_vla_plugin.apps.eval_demo [--workdir eval_demo_out] [--episodes 6] [--train-steps 60]

Be clear about what this shows: the loop (data -> model -> closed-loop success, videos), not a
skill. A tiny random-init model trained for minutes on a handful of demonstrations on a CPU
succeeds rarely or never; 0 % is the expected result. The same commands with a real base model,
more demonstrations and a GPU are how a real Lift (or LIBERO) number is produced.

Why record in-process rather than through vla-eval: vla-eval's recorder keeps videos and per-step
rows, not the observation dicts RLDS needs; the demonstrations are the scripted controller driving
the same environment (sim_lift.make_lift_env), with the same image transform (180-degree rotation)
that LiftBenchmark sends the model, so training frames and evaluation frames match.
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
def libero_like_features(resolution: int, full: bool = False):
    """OpenVLA's modified LIBERO RLDS schema (image, wrist_image, 8-d state, 7-d joint_state, 7-d action).

    full=False drops the wrist camera and joint state: the eval demo renders only agentview (a second
    camera doubles the simulator's cost) and nothing reads joint_state."""
    import tensorflow_datasets as tfds

    f = tfds.features
    image = lambda: f.Image(shape=(resolution, resolution, 3), dtype=np.uint8, encoding_format="jpeg")  # noqa: E731
    observation = {"image": image(), "state": f.Tensor(shape=(8,), dtype=np.float32)}
    if full:
        observation.update(wrist_image=image(), joint_state=f.Tensor(shape=(7,), dtype=np.float32))
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


def record_demos(episodes: int, steps: int, resolution: int) -> tuple[list[list[dict]], list[bool]]:
    """Drive Lift with the scripted controller for `steps` steps per episode (fixed length: the
    RLDS writer draws one length per dataset); a lifted cube keeps being held up after success."""
    from data_tools.images import JPEG_QUALITY
    from PIL import Image

    from llava_vla_plugin.apps.sim_lift import (INSTRUCTION, check_render, discretise_gripper, env_image, make_lift_env,
                                           quat_to_axisangle, scripted_lift_action)

    check_render()
    env = make_lift_env(seed=DEMO_SEED_OFFSET, resolution=resolution)
    demos, successes = [], []
    try:
        for ep in range(episodes):
            np.random.seed(DEMO_SEED_OFFSET + ep)  # robosuite 1.4 places the cube with numpy's global generator
            obs, state, rows, success = env.reset(), {}, [], False
            for _ in range(steps):
                action = discretise_gripper(scripted_lift_action(obs["robot0_eef_pos"], obs["cube_pos"], state))
                buf = io.BytesIO()  # stored as JPEG q95 bytes: what convert copies and the server's round trip matches
                Image.fromarray(env_image(obs["agentview_image"])).save(buf, format="JPEG", quality=JPEG_QUALITY)
                proprio = np.concatenate([obs["robot0_eef_pos"], quat_to_axisangle(obs["robot0_eef_quat"]),
                                          obs["robot0_gripper_qpos"]]).astype(np.float32)
                obs, _, _, _ = env.step(action)
                success = success or bool(env._check_success())
                rows.append({"observation": {"image": buf.getvalue(), "state": proprio},
                             "action": action.astype(np.float32), "reward": np.float32(success),
                             "language_instruction": INSTRUCTION})
            demos.append(rows)
            successes.append(success)
            print(f"      demo {ep + 1}/{episodes}: {steps} steps, lifted={success}", flush=True)
    finally:
        env.close()
    return demos, successes


def write_demos_rlds(root: Path, demos: list[list[dict]], resolution: int) -> Path:
    from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

    schema_dir = root / "_schema" / DATASET
    schema_dir.mkdir(parents=True, exist_ok=True)
    libero_like_features(resolution).save_config(str(schema_dir))
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
    ap.add_argument("--tiny-model", default=None, help="reuse a tiny model built by "
                    "`python -m llava_vla_plugin.apps.tiny_model DIR` (default: build one in the workdir)")
    args = ap.parse_args(argv)
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

    t0 = stage(1, f"recording {args.episodes} scripted Lift demonstrations ({args.demo_steps} steps each, MuJoCo on EGL)")
    # A child process: importing TensorFlow (stage 2) into a process that has loaded robosuite/MuJoCo's
    # libraries crashes it (segfault in TF's import, seen with tensorflow 2.x + mujoco 3.3.7 + numba).
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        demos, lifted = pool.apply(record_demos, (args.episodes, args.demo_steps, args.resolution))
    done(t0, f"{sum(lifted)}/{len(lifted)} demonstrations lifted the cube")

    t0 = stage(2, "writing them as RLDS (LIBERO-like schema)")
    rlds = work / "rlds"
    path = write_demos_rlds(rlds, demos, args.resolution)
    done(t0, f"{path}")

    t0 = stage(3, "converting to LLaVA JSON (data_tools.convert --registry configs/registry/lift_scripted.yaml)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MUJOCO_GL": "egl"}
    converted = work / "converted"
    run([sys.executable, "-m", "data_tools.convert", "--data-dir", str(rlds), "--datasets", DATASET,
         "--registry", str(REGISTRY_FILE), "--out", str(converted), "--no-progress"], env, work / "convert.log")
    n_train = sum(1 for _ in (converted / DATASET / "train.jsonl").open())
    n_val = sum(1 for _ in (converted / DATASET / "val.jsonl").open()) if (converted / DATASET / "val.jsonl").exists() else 0
    done(t0, f"{n_train} train / {n_val} val frames -> {converted}")

    t0 = stage(4, f"training the tiny model {args.train_steps} steps on CPU (scripts/finetune_ov_vla.sh, NUM_GPUS=0)")
    from llava_vla_plugin.apps.tiny_model import demo_tiny_model

    tiny = demo_tiny_model(args.tiny_model, work, "eval-demo")
    run_dir = work / "run"
    train_env = {**env, **tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
                 "DATA": str(converted / "mixture.yaml"), "IMAGE_FOLDER": str(converted), "OUTPUT_DIR": str(run_dir),
                 "NUM_GPUS": "0", "BATCH_SIZE": "4", "MAX_STEPS": str(args.train_steps),
                 "SAVE_STEPS": str(args.train_steps), "LR": "1e-2", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
                 "MODEL_MAX_LENGTH": "1024", "VLA_PYTHON": sys.executable}
    run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--gradient_checkpointing", "False", "--warmup_ratio", "0",
         "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"], train_env, work / "train.log")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    if losses:
        print(f"      training loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f} (last step's action-token accuracy, "
              f"teacher-forced: {losses[-1].get('action_accuracy_teacher_forced', float('nan')):.2f}; a training "
              "diagnostic: the number that counts here is stage 6's closed-loop success rate)")
    done(t0, f"checkpoint {run_dir}")

    t0 = stage(5, f"closed loop: {args.eval_episodes} Lift episodes of at most {args.eval_max_steps} steps through vla-eval")
    server_log, results = work / "server.log", work / "eval"
    try:
        with serving(checkpoint_server_args(run_dir, DATASET), train_env, server_log) as port:
            run(vla_eval_command(EVAL_CONFIG, port, results, episodes=args.eval_episodes, max_steps=args.eval_max_steps,
                                 params={"max_steps": args.eval_max_steps}), train_env, work / "eval.log")
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
               "checkpoint": str(run_dir)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\neval-demo finished in {time.perf_counter() - started:.0f} s; everything is under {work}")
    from llava_vla_plugin.apps.demo import print_next, tiny_env_prefix

    q, py = shlex.quote, shlex.quote(sys.executable)
    limits = (f"--benchmark-field episodes_per_task={args.eval_episodes} --benchmark-field max_steps={args.eval_max_steps} "
              f"--param max_steps={args.eval_max_steps}")
    print_next([
        ("serve it yourself (vla-eval's protocol on ws://127.0.0.1:8000, the config's address; Ctrl-C stops it)",
         f"{tiny_env_prefix(tiny.hf_home)} {py} -m llava_vla_plugin.infer.vla_eval_server --checkpoint {q(str(run_dir))} "
         f"--unnorm-key {DATASET}"),
        ("then, in a second shell, the closed loop of stage 5 against it (vla-eval; drop the last three options for "
         "the config's 2 x 60 steps)",
         f"MUJOCO_GL=egl {py} -m vla_eval.cli.main run -c {q(str(EVAL_CONFIG))} --no-docker "
         f"--output-dir {q(str(work / 'eval2'))} {limits}"),
        ("a report of the results: success with confidence intervals, failure reasons",
         f"{py} -m llava_vla_plugin.experiments.closed_loop_report {q(str(results))} --out {q(str(work / 'report'))}"),
        ("more demonstrations and steps (hours on a CPU; a GPU helps), into a new folder",
         f"MUJOCO_GL=egl {py} -m llava_vla_plugin.apps.eval_demo --workdir {q(str(work.parent / (work.name + '_more')))} "
         "--episodes 50 --train-steps 2000"),
        ("the real thing: the LIBERO recipe in README.md (configs/vla_eval/libero_*.yaml)", None),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
