"""scripts/finetune_ov_vla.sh through torchrun + DeepSpeed, two CPU processes (gloo): ZeRO-2 and
ZeRO-3 both train, save checkpoints with the VLA files, and initialise the action-token rows to the
vocabulary mean (under ZeRO-3 the embedding is partitioned: the rows must be gathered to be set)."""
import json
import socket
import subprocess

import numpy as np
import pytest

from conftest import ROOT, requires_upstream, subprocess_env
from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

pytestmark = [requires_upstream, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_two_cpu_processes(tiny_model, tmp_path, config):
    from safetensors.numpy import load_file

    write_vla_dataset(tmp_path, "ds", 8, image_fn=lambda i, r: colour_image(r, i % 3), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    out = tmp_path / "run"
    env = subprocess_env({**tiny_model.env(), "MODEL": str(tiny_model.llava_dir), "VISION_TOWER": tiny_model.vision_tower,
                          "DATA": str(tmp_path / "ds/train.jsonl"), "IMAGE_FOLDER": str(tmp_path), "OUTPUT_DIR": str(out),
                          "NUM_GPUS": "2", "PRECISION": "fp32", "DEEPSPEED": f"configs/{config}.json", "BATCH_SIZE": "2",
                          "MAX_STEPS": "1", "SAVE_STEPS": "1", "LR": "0", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
                          "MODEL_MAX_LENGTH": "1024", "MASTER_PORT": str(_free_port())})
    proc = subprocess.run(["bash", "scripts/finetune_ov_vla.sh", "--gradient_checkpointing", "False", "--lr_scheduler_type", "constant",
                           "--warmup_ratio", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert np.isfinite(history[0]["loss"]) and "action_accuracy" in history[0]
    for folder in (out, out / "checkpoint-1"):
        assert (folder / "vla_action_tokenizer.json").exists() and (folder / "dataset_statistics.json").exists(), folder
    base = load_file(str(tiny_model.llava_dir / "model.safetensors"))["model.embed_tokens.weight"]
    saved = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    mean = base[:151646].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(saved[151646:151902], np.broadcast_to(mean, (256, mean.size)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(saved[:151646], base[:151646])  # LR 0: nothing else moved
