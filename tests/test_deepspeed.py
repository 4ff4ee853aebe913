"""scripts/finetune_ov_vla.sh through torchrun + DeepSpeed, two CPU processes (gloo): ZeRO-2 and
ZeRO-3 both train, save checkpoints with the VLA files, and initialise the action-token rows to the
vocabulary mean (under ZeRO-3 the embedding is partitioned: the rows must be gathered to be set).
Two "nodes" on localhost (NNODES=2, NODE_RANK 0/1, one process each) train and save too.

Overrides, and why: MODEL/VISION_TOWER (tiny offline model), MAX_STEPS/BATCH_SIZE/LR (one or two
short steps; LR 0 makes "nothing else moved" checkable), IMAGE_ASPECT_RATIO=pad and
GRADIENT_CHECKPOINTING False (fewer visual tokens and no recomputation keep these multi-process runs
short on 2 cores; anyres and checkpointing are exercised in test_launcher.py), NUM_WORKERS=0 (two
ranks x 4 forked workers on 2 cores only add start-up time; 4 workers are tested in test_launcher.py),
MODEL_MAX_LENGTH=1024 (pad needs 730 visual tokens; the default 4096 only pads more)."""
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
                          "NUM_GPUS": "2", "DEEPSPEED": f"configs/{config}.json", "BATCH_SIZE": "2",
                          "MAX_STEPS": "1", "SAVE_STEPS": "1", "LR": "0", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
                          "MODEL_MAX_LENGTH": "1024", "MASTER_PORT": str(_free_port())})
    # constant LR without warm-up: with LR 0 nothing but the action rows may differ from the base model
    proc = subprocess.run(["bash", "scripts/finetune_ov_vla.sh", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"],
                          cwd=ROOT, env={**env, "GRADIENT_CHECKPOINTING": "False"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert np.isfinite(history[0]["loss"]) and "action_accuracy_teacher_forced" in history[0]
    for folder in (out, out / "checkpoint-1"):
        assert (folder / "vla_action_tokenizer.json").exists() and (folder / "dataset_statistics.json").exists(), folder
    base = load_file(str(tiny_model.llava_dir / "model.safetensors"))["model.embed_tokens.weight"]
    saved = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    mean = base[:151646].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(saved[151646:151902], np.broadcast_to(mean, (256, mean.size)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(saved[:151646], base[:151646])  # LR 0: nothing else moved


def test_two_nodes_on_localhost(tiny_model, tmp_path):
    """NNODES=2: two launcher invocations, NODE_RANK 0 and 1, one CPU process each (gloo, ZeRO-2), as two
    hosts would run them. No PRECISION: the launcher sees no CUDA and picks fp32 (no --tf32)."""
    write_vla_dataset(tmp_path, "ds", 8, image_fn=lambda i, r: colour_image(r, i % 3), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    out = tmp_path / "run"
    base = subprocess_env({**tiny_model.env(), "MODEL": str(tiny_model.llava_dir), "VISION_TOWER": tiny_model.vision_tower,
                           "DATA": str(tmp_path / "ds/train.jsonl"), "IMAGE_FOLDER": str(tmp_path), "OUTPUT_DIR": str(out),
                           "NUM_GPUS": "1", "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                           "BATCH_SIZE": "2", "MAX_STEPS": "2", "SAVE_STEPS": "2", "IMAGE_ASPECT_RATIO": "pad",
                           "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "1024", "GRADIENT_CHECKPOINTING": "False"})
    base.pop("PRECISION", None)
    nodes = [subprocess.Popen(["bash", str(ROOT / "scripts/finetune_ov_vla.sh")], cwd=tmp_path, env={**base, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=1200))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "node 1 of 2" in outputs[1][0] and "no CUDA found" in outputs[0][0]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and np.isfinite(state["log_history"][0]["loss"])
    assert (out / "checkpoint-2/vla_action_tokenizer.json").exists() and any((out / "checkpoint-2").glob("global_step2"))
    assert "PRECISION: fp32" in (out / "launch_config.yaml").read_text()
    assert json.loads((out / "vla_run_config.json").read_text())["bf16"] is False
