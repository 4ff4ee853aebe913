"""The product's main job, end to end, on a CPU in a few minutes (`make demo`):

  1. write two small RLDS datasets with the real OXE schemas (bridge_orig, fractal20220817_data)
  2. convert them with data_tools.convert (OpenVLA's transforms, native-resolution images) and validate
  3. build the tiny llava_qwen model offline
  4. train it ~30 steps with scripts/finetune_ov_vla.sh (one CPU process), with held-out validation
  5. predict an action for one held-out frame with VLAPolicy and compare with the recorded one

    python -m llava_vla_plugin.apps.demo [--workdir demo_out] [--steps 30]

Every stage prints what it read and wrote; the run fails loudly at the first stage that fails. It ends
with `next:` commands that run as printed from any folder (tests/test_demo.py runs each one): the ones
that load the tiny model start with its HF_HOME, where its vision tower resolves offline.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (schema, episodes per split): bridge has a val split; fractal's val is train[95%:] as in OpenVLA
DATASETS = [("bridge_orig", {"train": 5, "val": 2}), ("fractal20220817_data", {"train": 6})]


def stage(n: int, title: str) -> float:
    print(f"\n[{n}/5] {title}", flush=True)
    return time.perf_counter()


def done(t0: float, msg: str) -> None:
    print(f"      {msg}  ({time.perf_counter() - t0:.1f} s)", flush=True)


def run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"demo: `{' '.join(cmd[:4])} ...` failed (exit {proc.returncode}); log {log}:\n{tail}")


def tiny_env_prefix(hf_home: str | Path) -> str:
    """What a command that loads the tiny model needs in a fresh shell: its vision tower is published under a
    hub-like id (`tiny-vla/siglip-tiny`) in the tiny model's own offline cache, not in the user's HF_HOME."""
    return f"HF_HOME={shlex.quote(str(hf_home))} HF_HUB_OFFLINE=1"


def print_next(items: list[tuple[str, str | None]]) -> None:
    """The demos' closing `next:` block: a description line (2 spaces) and its command (4 spaces, one line,
    runnable verbatim by bash from any folder); an item without a command is a pointer."""
    print("\nnext (each command runs as printed, from any folder):")
    for what, command in items:
        print(f"  {what}:\n    {command}" if command else f"  {what}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava_vla_plugin.apps.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_out", help="folder for everything the demo writes (replaced)")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--image-size", default="96x128", help="HxW of the synthetic camera frames")
    ap.add_argument("--tiny-model", default=None, help="reuse a tiny model built by "
                    "`python -m llava_vla_plugin.apps.tiny_model DIR` (default: build one in the workdir)")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    from llava_vla_plugin.core.env import import_quietly

    import_quietly("tensorflow_datasets")  # TensorFlow's start-up chatter would hide the stage output
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    h, w = (int(x) for x in args.image_size.lower().split("x"))
    started = time.perf_counter()

    t0 = stage(1, "writing RLDS datasets with the real OXE schemas")
    from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

    rlds = work / "rlds"
    for name, splits in DATASETS:
        path = write_rlds_dataset(rlds, name, splits=splits, steps=(8, 12), shards=2, image_size=(h, w), seed=0)
        print(f"      {name}: {splits} episodes -> {path}")
    done(t0, "RLDS written")

    t0 = stage(2, "converting to LLaVA JSON (data_tools.convert) and validating")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = work / "converted"
    run([sys.executable, "-m", "data_tools.convert", "--data-dir", str(rlds), "--datasets", ",".join(n for n, _ in DATASETS),
         "--out", str(out), "--no-progress"], env, work / "convert.log")
    run([sys.executable, "-m", "data_tools.validate", str(out)], env, work / "validate.log")
    for name, _ in DATASETS:
        n_train = sum(1 for _ in (out / name / "train.jsonl").open())
        n_val = sum(1 for _ in (out / name / "val.jsonl").open()) if (out / name / "val.jsonl").exists() else 0
        print(f"      {name}: {n_train} train / {n_val} val frames")
    print(f"      validate: {(work / 'validate.log').read_text().strip().splitlines()[-1]}")
    done(t0, f"converted -> {out} (logs {work / 'convert.log'}, {work / 'validate.log'})")

    t0 = stage(3, "building the tiny llava_qwen model (offline)")
    from llava_vla_plugin.apps.tiny_model import demo_tiny_model

    tiny = demo_tiny_model(args.tiny_model, work, "demo")
    done(t0, f"model {tiny.llava_dir}, vision tower {tiny.vision_tower} (offline, from HF_HOME={tiny.hf_home})")

    t0 = stage(4, f"training {args.steps} steps on CPU (scripts/finetune_ov_vla.sh, NUM_GPUS=0)")
    val = out / "bridge_orig" / "val.jsonl"
    run_dir = work / "run"
    # Launcher defaults changed for a few-minute CPU demo: the tiny offline model (no downloads),
    # NUM_GPUS=0 (CPU), few steps with a high LR so the loss visibly moves, pad images and no gradient
    # checkpointing (fewer tokens, no recomputation: ~3x faster on CPU), NUM_WORKERS=0 (worker start-up
    # costs more than it saves for 30 tiny steps), a fresh run each time (the workdir is replaced).
    # The defaults themselves are tested in tests/test_launcher.py.
    launch = {"MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
              "DATA": str(out / "mixture.yaml"), "IMAGE_FOLDER": str(out), "OUTPUT_DIR": str(run_dir), "NUM_GPUS": "0",
              "BATCH_SIZE": "4", "MAX_STEPS": str(args.steps), "SAVE_STEPS": str(args.steps), "LR": "1e-2",
              "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "1024", "VAL_DATA": str(val),
              "EVAL_STEPS": "0", "GRADIENT_CHECKPOINTING": "False", "RESUME": "never"}
    if Path(sys.executable) != ROOT / ".venv" / "bin" / "python":  # the launcher's default interpreter
        launch["VLA_PYTHON"] = sys.executable
    launcher_args = ["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--warmup_ratio", "0",
                     "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"]
    train_env = {**env, **tiny.env(), **launch}
    run(launcher_args, train_env, work / "train.log")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    final = json.loads((run_dir / "final_metrics.json").read_text()) if (run_dir / "final_metrics.json").exists() else {}
    nan = float("nan")
    print(f"      training loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f} (last step's action-token accuracy, "
          f"teacher-forced: {losses[-1].get('action_accuracy_teacher_forced', nan):.2f})")
    if final:
        print(f"      held-out {val.parent.name} frames, teacher-forced (each action token predicted from the true previous ones):\n"
              f"        action-token loss {final.get('val_action_loss', nan):.3f}; accuracy "
              f"{final.get('val_action_accuracy_teacher_forced', nan):.2f} (argmax over the whole vocabulary), "
              f"{final.get('val_action_accuracy_teacher_forced_constrained', nan):.2f} (argmax over the 256 action tokens); "
              f"L1 {final.get('val_action_l1', nan):.3f}")
    print("      these are training diagnostics. The accuracy to read is the free-running policy accuracy (constrained\n"
          "      greedy generation, each token from the model's own previous ones, as a robot runs it): the\n"
          "      `generated token accuracy` that the first `next:` command below (llava_vla_plugin.infer.eval) prints.")
    print(f"      near-zero accuracy is expected: a {args.steps}-step CPU run of a 10M-parameter random model "
          "only shows that the pipeline works, not that it learns")
    done(t0, f"checkpoint {run_dir} (+ vla_action_tokenizer.json, dataset_statistics.json, training_curves.png); "
             f"log {work / 'train.log'}")

    t0 = stage(5, "predicting an action for a held-out frame (VLAPolicy)")
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from llava_vla_plugin import VLAPolicy\n"
        "ckpt, val, folder = sys.argv[1:4]\n"
        "s = json.loads(open(val).readline())\n"
        "policy = VLAPolicy.from_pretrained(ckpt, device='cpu')\n"
        "instr = s['conversations'][0]['value'].split('take to ', 1)[1].rstrip('?')\n"
        "a = policy.predict_action(Image.open(f\"{folder}/{s['image']}\"), instr, unnorm_key=s['dataset'])\n"
        "print(json.dumps({'id': s['id'], 'instruction': instr, 'predicted': a.round(4).tolist(), 'recorded': np.round(s['action_raw'], 4).tolist()}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir), str(val), str(out)], env=train_env,
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"demo: prediction failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"      frame      {result['id']}: \"{result['instruction']}\"")
    print(f"      predicted  {result['predicted']}")
    print(f"      recorded   {result['recorded']}")
    done(t0, "predicted with constrained decoding, un-normalized with the checkpoint's statistics")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; everything is under {work}")
    q, py, hf = shlex.quote, shlex.quote(sys.executable), tiny_env_prefix(tiny.hf_home)
    longer = max(10 * args.steps, 100)
    longer_run = work / f"run-{longer}"
    launch_longer = {**launch, "OUTPUT_DIR": str(longer_run), "MAX_STEPS": str(longer), "SAVE_STEPS": str(longer),
                     "EVAL_STEPS": str(max(longer // 5, 1))}
    print_next([
        ("evaluate the checkpoint on the held-out frames (the free-running `generated token accuracy`)",
         f"{hf} {py} -m llava_vla_plugin.infer.eval --checkpoint {q(str(run_dir))} --data {q(str(val))} "
         f"--image-folder {q(str(out))} --out {q(str(work / 'eval'))}"),
        ("serve it for a robot or simulator (OpenVLA's POST /act, GET /health; Ctrl-C stops it)",
         f"{hf} {py} -m llava_vla_plugin.infer.serve --checkpoint {q(str(run_dir))} --port 8000"),
        (f"train longer ({longer} steps, validation every {launch_longer['EVAL_STEPS']}); then look at "
         f"{longer_run / 'training_curves.png'}",
         f"{hf} " + " ".join(f"{k}={q(v)}" for k, v in launch_longer.items()) + " " + shlex.join(launcher_args)),
        ("on real data and GPUs: README.md, \"The flow\" (its \"CPU quick-start\" runs it with this tiny model)", None),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
