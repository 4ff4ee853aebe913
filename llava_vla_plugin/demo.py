"""The product's main job, end to end, on a CPU in a few minutes (`make demo`):

  1. write two small RLDS datasets with the real OXE schemas (bridge_orig, fractal20220817_data)
  2. convert them with data_tools.convert (OpenVLA's transforms, native-resolution images) and validate
  3. build the tiny llava_qwen model offline
  4. train it ~30 steps with scripts/finetune_ov_vla.sh (one CPU process), with held-out validation
  5. predict an action for one held-out frame with VLAPolicy and compare with the recorded one

    python -m llava_vla_plugin.demo [--workdir demo_out] [--steps 30]

Every stage prints what it read and wrote; the run fails loudly at the first stage that fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_out", help="folder for everything the demo writes (replaced)")
    ap.add_argument("--steps", type=int, default=30, help="training steps")
    ap.add_argument("--image-size", default="96x128", help="HxW of the synthetic camera frames")
    args = ap.parse_args(argv)
    from llava_vla_plugin.env import import_quietly

    import_quietly("tensorflow_datasets")  # TensorFlow's start-up chatter would hide the stage output
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    h, w = (int(x) for x in args.image_size.lower().split("x"))
    started = time.perf_counter()

    t0 = stage(1, "writing RLDS datasets with the real OXE schemas")
    from llava_vla_plugin.testing.rlds_fixture import write_rlds_dataset

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
    from llava_vla_plugin.testing.tiny_model import build_tiny_model

    tiny = build_tiny_model(work / "tiny_model")
    done(t0, f"model {tiny.llava_dir}, vision tower {tiny.vision_tower}")

    t0 = stage(4, f"training {args.steps} steps on CPU (scripts/finetune_ov_vla.sh, NUM_GPUS=0)")
    val = out / "bridge_orig" / "val.jsonl"
    run_dir = work / "run"
    # Launcher defaults changed for a few-minute CPU demo: the tiny offline model (no downloads),
    # NUM_GPUS=0 (CPU), few steps with a high LR so the loss visibly moves, pad images and no gradient
    # checkpointing (fewer tokens, no recomputation: ~3x faster on CPU), NUM_WORKERS=0 (worker start-up
    # costs more than it saves for 30 tiny steps), a fresh run each time (the workdir is replaced).
    # The defaults themselves are tested in tests/test_launcher.py.
    train_env = {**env, **tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
                 "DATA": str(out / "mixture.yaml"), "IMAGE_FOLDER": str(out), "OUTPUT_DIR": str(run_dir), "NUM_GPUS": "0",
                 "BATCH_SIZE": "4", "MAX_STEPS": str(args.steps), "SAVE_STEPS": str(args.steps), "LR": "1e-2",
                 "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "1024", "VAL_DATA": str(val),
                 "EVAL_STEPS": "0", "VLA_PYTHON": sys.executable, "GRADIENT_CHECKPOINTING": "False", "RESUME": "never"}
    run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--warmup_ratio", "0",
         "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model"], train_env, work / "train.log")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    losses = [h for h in history if "loss" in h]
    final = json.loads((run_dir / "final_metrics.json").read_text()) if (run_dir / "final_metrics.json").exists() else {}
    print(f"      loss {losses[0]['loss']:.2f} -> {losses[-1]['loss']:.2f}; train action accuracy (teacher-forced) "
          f"{losses[-1].get('action_accuracy_teacher_forced', float('nan')):.2f}")
    if final:
        print(f"      held-out ({val.parent.name}): action loss {final.get('val_action_loss', float('nan')):.3f}, "
              f"accuracy {final.get('val_action_accuracy_teacher_forced', float('nan')):.2f} (teacher-forced) / "
              f"{final.get('val_action_accuracy_teacher_forced_constrained', float('nan')):.2f} (action tokens only), "
              f"L1 {final.get('val_action_l1', float('nan')):.3f}")
    print(f"      near-zero held-out accuracy is expected: a {args.steps}-step CPU run of a 10M-parameter random model "
          "only shows that the pipeline works, not that it learns")
    done(t0, f"checkpoint {run_dir} (+ vla_action_tokenizer.json, dataset_statistics.json); log {work / 'train.log'}")

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
    print(f"""
next:
  evaluate the checkpoint on the held-out frames:
    {sys.executable} -m llava_vla_plugin.eval --checkpoint {run_dir} --data {val} --image-folder {out} --report {work / 'eval'}
  serve it for a robot or simulator:
    {sys.executable} -m llava_vla_plugin.serve --checkpoint {run_dir} --port 8000
  train on real data (README: download, convert, then):
    NUM_GPUS=8 DATA=converted/mixture.yaml OUTPUT_DIR=runs/ov-vla bash {ROOT / 'scripts/finetune_ov_vla.sh'}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
