"""Train several tiny runs in one Python process, each with exactly the arguments scripts/finetune_ov_vla.sh
builds, then predict with VLAPolicy: for tests that train many short runs.

    python -m llava_vla_plugin.testing.inprocess_train JOBS.json

Why: on the 2-core test machine a launcher run pays ~10-20 s of Python start-up (torch, transformers,
DeepSpeed, upstream) before its first step, twice with a separate prediction process; a test that trains
four runs pays it once here. The code path is the users': the launcher is run for real with `VLA_PYTHON`
pointing at a recorder that prints the argv it would exec, and that argv is handed to
`llava_vla_plugin.train.main` (upstream's train() with the plugin: VLATrainer, VLADataset, the sparse head).

JOBS.json: a list of {"env": {launcher variables}, "args": [extra trainer arguments], "predict": {"val": jsonl,
"folder": image folder, "max_step": int, "variants": [other loads, see predict]}, "result": file name}; each job's OUTPUT_DIR gets `result` (default
`inprocess_result.json`) with the normalized predictions of the val rows whose step <= max_step, or the error
that stopped the job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT = "inprocess_result.json"
# The launcher also runs its helpers with VLA_PYTHON (scripts/launch_config.py to read CONFIG and write the
# run's launch_config.yaml, llava_vla_plugin.train.preflight to check the input): those calls run for real; only the
# training exec is recorded.
_RECORDER = """#!/bin/sh
case "$1" in
  */launch_config.py) exec "{python}" "$@" ;;
esac
if [ "$1" = "-m" ] && [ "$2" = "llava_vla_plugin.train.preflight" ]; then exec "{python}" "$@"; fi
exec "{python}" -c 'import json, sys; print("VLA_ARGV" + json.dumps(sys.argv[1:]))' "$@"
"""


def launcher_argv(env: dict[str, str], args: list[str]) -> list[str]:
    """The python argv (after the interpreter) scripts/finetune_ov_vla.sh would exec for `env` and `args`."""
    with tempfile.TemporaryDirectory() as d:
        recorder = Path(d) / "record_argv.sh"
        recorder.write_text(_RECORDER.format(python=sys.executable))
        recorder.chmod(0o755)
        proc = subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), *args], env={**os.environ, **env,
                              "VLA_PYTHON": str(recorder)}, capture_output=True, text=True, timeout=60, cwd=ROOT)
    if proc.returncode != 0 or "VLA_ARGV" not in proc.stdout:
        raise RuntimeError(f"the launcher did not get to exec python: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.split("VLA_ARGV", 1)[1].splitlines()[0])


def train_in_process(argv: list[str]) -> None:
    """Run `python -m llava_vla_plugin.train ARGV...` in this process (argv[0:2] == ['-m', module])."""
    if argv[:2] != ["-m", "llava_vla_plugin.train"]:
        raise RuntimeError(f"the launcher runs {argv[:2]}, not one CPU process of llava_vla_plugin.train (NUM_GPUS=0?)")
    import torch

    from llava_vla_plugin.train import run as train
    saved = sys.argv
    sys.argv = ["llava_vla_plugin.train", *argv[2:]]
    try:
        torch.manual_seed(0)
        train.main()
    finally:
        sys.argv = saved


def predict(out: Path, val: Path, folder: Path, max_step: int, variants: list[str] | None = None) -> dict:
    """`variants`: other loads of the same run to answer the same rows, e.g. ["unmerged", "merged", "checkpoint-2"]
    for a LoRA run ("unmerged": OUTPUT_DIR with the adapter applied on the fly; a name: that subdirectory)."""
    from PIL import Image

    from llava_vla_plugin.infer.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(out, device="cpu", dtype="float32")
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    rows = [r for r in rows if r["step"] <= max_step]
    images = [Image.open(folder / r["image"]).convert("RGB") for r in rows]
    inputs = {}  # the views and state the checkpoint was trained on (vla_inputs.json)
    if policy.inputs.wrist:
        inputs["wrist_images"] = [Image.open(folder / r["image_wrist"]).convert("RGB") for r in rows]
    if policy.inputs.proprio:
        from data_tools.converted_format import EpisodeActions, episode_proprio_file

        states = EpisodeActions.load(val.parent / episode_proprio_file("val"))
        inputs["states"] = [states.episode(r["episode"])[0][list(states.episode(r["episode"])[1]).index(r["step"])] for r in rows]
        inputs["unnorm_key"] = rows[0]["dataset"]
    norm = policy.predict_normalized(images, [r["instruction"] for r in rows], **inputs)
    restricted = policy.head_restricted
    one = policy.predict_action(images[0], rows[0]["instruction"], unnorm_key=inputs.get("unnorm_key"),
                                wrist_image=inputs["wrist_images"][0] if "wrist_images" in inputs else None,
                                proprio=inputs["states"][0] if "states" in inputs else None)
    full = None
    if policy.action_repr.decoding == "tokens":  # the same held-out batch with the full LM head (issue 23 item 2)
        policy.restrict_head = False
        full = policy.predict_normalized(images, [r["instruction"] for r in rows], **inputs).tolist()
    others = {}
    for name in variants or []:
        other = (VLAPolicy.from_pretrained(out, device="cpu", dtype="float32", merge_lora=False) if name == "unmerged"
                 else VLAPolicy.from_pretrained(out / name, device="cpu", dtype="float32"))
        others[name] = {"normalized": other.predict_normalized(images, [r["instruction"] for r in rows], **inputs).tolist(),
                        "repr": other.action_repr.name, "horizon": other.horizon, "peft": type(other.model).__name__}
    return {"episodes": [r["episode"] for r in rows], "steps": [r["step"] for r in rows], "normalized": norm.tolist(),
            "variants": others,
            "one_shape": list(one.shape), "repr": policy.action_repr.name, "horizon": policy.horizon,
            "decode_failures": policy.decode_failures, "head_restricted": restricted, "normalized_full_head": full}


def main(argv: list[str] | None = None) -> int:
    jobs = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    failed = 0
    for job in jobs:
        out = Path(job["env"]["OUTPUT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        try:
            train_in_process(launcher_argv(job["env"], job.get("args", [])))
            p = job.get("predict")
            result = predict(out, Path(p["val"]), Path(p["folder"]), int(p["max_step"]), p.get("variants")) if p else {}
        except Exception:  # recorded for the test that owns this job; the other jobs still run
            failed += 1
            result = {"error": traceback.format_exc()[-6000:]}
        (out / job.get("result", RESULT)).write_text(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
