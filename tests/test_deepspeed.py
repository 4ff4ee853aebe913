"""scripts/finetune_ov_vla.sh through torchrun + DeepSpeed, two CPU processes (gloo): ZeRO-2 and
ZeRO-3 both train, save checkpoints with the VLA files, and initialise the action-token rows to the
vocabulary mean (under ZeRO-3 the embedding is partitioned: the rows must be gathered to be set), with the
`bins` and the `parallel_l1` representations (the regression head is saved whole and loads in VLAPolicy).
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

from policy_files_check import assert_same_policy
from llava_vla_plugin.core import checkpoint
from conftest import ROOT, requires_upstream, run_py, subprocess_env
from data_tools.converted_format import image_path
from llava_vla_plugin.testing.chunk_samples import write_episodes
from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

pytestmark = [requires_upstream, pytest.mark.slow]


PREDICT = r'''
import json, sys
from PIL import Image
from llava_vla_plugin.infer.policy import VLAPolicy
policy = VLAPolicy.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
print(json.dumps(policy.predict_action(Image.open(sys.argv[2]).convert("RGB"), "pick up the block").tolist()))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Representations under ZeRO (issue 14 item 7): bins_chunk shares bins' code path here (token rows, no head; only
# the dataset's window length differs, which ZeRO does not see); parallel_l1 adds a module created after zero.Init,
# whose slot row is set on gathered embeddings and whose weights must be gathered to be saved.
@pytest.mark.parametrize("config,action_repr", [("zero2", "bins"), ("zero3", "bins"), ("zero2", "parallel_l1"),
                                                ("zero3", "parallel_l1")])
def test_deepspeed_two_cpu_processes(tiny_model, tmp_path, config, action_repr):
    from safetensors.numpy import load_file

    horizon = 4 if action_repr == "parallel_l1" else 1
    if horizon == 1:
        write_vla_dataset(tmp_path, "ds", 8, image_fn=lambda i, r: colour_image(r, i % 3), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    else:  # 4 episodes of H steps: one oft window each, 2 per rank
        rng = np.random.default_rng(0)
        write_episodes(tmp_path, "ds", [rng.uniform(-1, 1, (horizon, 7)) for _ in range(4)],
                       image_fn=lambda e, t, r: colour_image(r, e % 3))
    out = tmp_path / "run"
    env = subprocess_env({**tiny_model.env(), "MODEL": str(tiny_model.llava_dir), "VISION_TOWER": tiny_model.vision_tower,
                          "DATA": str(tmp_path / "ds/train.jsonl"), "IMAGE_FOLDER": str(tmp_path), "OUTPUT_DIR": str(out),
                          "NUM_GPUS": "2", "DEEPSPEED": f"configs/{config}.json", "BATCH_SIZE": "2",
                          "MAX_STEPS": "1", "SAVE_STEPS": "1", "LR": "0", "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0",
                          "MODEL_MAX_LENGTH": "1024", "MASTER_PORT": str(_free_port()),
                          "ACTION_REPR": action_repr, "HORIZON": str(horizon)})
    # constant LR without warm-up: with LR 0 nothing but the action rows may differ from the base model
    proc = subprocess.run(["bash", "scripts/finetune_ov_vla.sh", "--lr_scheduler_type", "constant", "--warmup_ratio", "0"],
                          cwd=ROOT, env={**env, "GRADIENT_CHECKPOINTING": "False"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert np.isfinite(history[0]["loss"]) and "action_accuracy_teacher_forced" in history[0]
    for folder in (out, out / "checkpoint-1"):
        assert (folder / "vla_action_tokenizer.json").exists() and (folder / "dataset_statistics.json").exists(), folder
    assert_same_policy(out, out / "checkpoint-1")  # ZeRO-2/3: the final save and checkpoint-N read the same
    assert checkpoint.read(out).repr_config.name == action_repr and checkpoint.read(out).repr_config.horizon == horizon
    base = load_file(str(tiny_model.llava_dir / "model.safetensors"))["model.embed_tokens.weight"]
    saved = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    mean = base[:151646].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(saved[151646:151902], np.broadcast_to(mean, (256, mean.size)), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(saved[:151646], base[:151646])  # LR 0: nothing else moved
    if action_repr == "parallel_l1":  # the head, gathered: full shapes, the same in both files, and it loads
        np.testing.assert_allclose(saved[151902], mean, rtol=0, atol=1e-6)  # the slot row, set on gathered rows too
        heads = [load_file(str(folder / "vla_action_head.safetensors")) for folder in (out, out / "checkpoint-1")]
        assert heads[0]["slots.weight"].shape == (horizon * 7, saved.shape[1]), {k: v.shape for k, v in heads[0].items()}
        assert heads[0].keys() == heads[1].keys() and all(np.array_equal(heads[0][k], heads[1][k]) for k in heads[0])
        proc = run_py(["-c", PREDICT, str(out), str(tmp_path / image_path("ds", "train", 0, 0))], env=env)  # HF_HOME: tower
        assert proc.returncode == 0, proc.stderr[-4000:]
        action = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
        assert action.shape == (horizon, 7) and np.isfinite(action).all()


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
    assert "node 1 of 2" in outputs[1][0] and "no CUDA GPU found" in outputs[0][1]
    # CPU processes: torch's AdamW, no JIT-compiled DeepSpeed Adam (scripts/launch_config.py cpu-deepspeed)
    assert "torch_adam" in outputs[0][0] and "fused_adam" not in "".join(outputs[0] + outputs[1])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and np.isfinite(state["log_history"][0]["loss"])
    assert (out / "checkpoint-2/vla_action_tokenizer.json").exists() and any((out / "checkpoint-2").glob("global_step2"))
    assert "PRECISION: fp32" in (out / "launch_config.yaml").read_text()
    assert json.loads((out / "vla_run_config.json").read_text())["bf16"] is False
