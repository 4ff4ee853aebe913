"""Training through scripts/finetune_ov_vla.sh on CPU, as users run it, with the tiny model.

Covers: upstream's trainer runs after the patches; checkpoints carry the VLA files; resuming works;
a process that never imports the plugin loads the checkpoint with upstream's load_pretrained_model
and generates action tokens; the tiny model overfits 8 samples; it learns from its images (and does
not when the <image> token is dropped); the configuration guards fail fast.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from policy_files_check import assert_same_policy
from conftest import ROOT, UPSTREAM_REASON, requires_upstream, subprocess_env, upstream_available
from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

pytestmark = [requires_upstream, pytest.mark.slow]

OBJECTS = ["cup", "block", "sponge", "carrot", "spoon", "bowl", "towel", "can"]


@pytest.fixture(scope="module")
def fast_tiny(tmp_path_factory):
    """Tiny model whose tower is the patch embedding only: same code path, 10x cheaper images."""
    if not upstream_available():
        pytest.skip(UPSTREAM_REASON)
    from llava_vla_plugin.apps.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("fast_tiny"), vision_layers=1)


def finetune(tiny, data: Path, image_folder: Path, out: Path, steps: int, *extra: str, lr: float = 1e-2,
             batch: int = 8, save_steps: int = 1000, check: bool = True) -> subprocess.CompletedProcess:
    """The launcher with the defaults these learning tests cannot afford, each for a reason:
    NUM_GPUS=0 (no GPU), the tiny model, LR 1e-2 constant without warm-up (learn 8 samples in ~100
    steps), IMAGE_ASPECT_RATIO=pad + MODEL_MAX_LENGTH=1024 + --gradient_checkpointing False (3x fewer
    visual tokens, no recomputation: these runs take 90-150 steps), NUM_WORKERS=0 (worker start-up
    dominates 8-sample epochs), --mm_tunable_parts without the vision tower (the 1-layer tower stays
    as built), --seed 0. The defaults (4 workers, checkpointing, anyres_max_9) are asserted in
    tests/test_launcher.py."""
    env = subprocess_env({
        **tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower, "DATA": str(data),
        "IMAGE_FOLDER": str(image_folder), "OUTPUT_DIR": str(out), "NUM_GPUS": "0", "BATCH_SIZE": str(batch),
        "MAX_STEPS": str(steps), "SAVE_STEPS": str(save_steps), "LR": str(lr), "IMAGE_ASPECT_RATIO": "pad",
        "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "1024", "VLA_PYTHON": str(Path(os.sys.executable)),
    })
    args = ["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--gradient_checkpointing", "False",
            "--warmup_ratio", "0", "--lr_scheduler_type", "constant", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
            "--seed", "0", *extra]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


GENERATE = r"""
import json, sys
assert "llava_vla_plugin" not in sys.modules
import torch
from PIL import Image
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images, tokenizer_image_token
ckpt, samples_path, folder = sys.argv[1:4]
tok, model, proc, _ = load_pretrained_model(ckpt, None, "llava_qwen", device_map="cpu", torch_dtype="float32")
out = []
for line in open(samples_path):
    s = json.loads(line)
    img = Image.open(f"{folder}/{s['image']}").convert("RGB")
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              + s["conversations"][0]["value"] + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer_image_token(prompt, tok, -200, return_tensors="pt").unsqueeze(0)
    # a list of per-image tensors, as upstream's OneVision examples pass them (and as training batches
    # them); a stacked tensor takes another branch that drops the image newline token
    pixels = [t for t in process_images([img], proc, model.config)]
    gen = model.generate(ids, images=pixels, image_sizes=[img.size],
                         modalities=["image"], do_sample=False, max_new_tokens=9, pad_token_id=tok.pad_token_id)
    out.append(tok.convert_ids_to_tokens(gen[0].tolist()))
print("RESULT" + json.dumps({"tokens": out, "plugin_imported": "llava_vla_plugin" in sys.modules}))
"""


def generate_plain_upstream(tiny, ckpt: Path, samples: Path, folder: Path) -> list[list[str]]:
    """Greedy generation in a subprocess that never imports the plugin."""
    env = subprocess_env({**tiny.env(), "PYTHONPATH": ""})
    proc = subprocess.run([os.sys.executable, "-c", GENERATE, str(ckpt), str(samples), str(folder)], env=env,
                          capture_output=True, text=True, timeout=600, cwd="/")
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["plugin_imported"] is False
    return result["tokens"]


def expected_tokens(samples: Path) -> list[list[str]]:
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    at = ActionTokenizer()
    rows = [json.loads(l) for l in samples.read_text().splitlines()]
    return [[at.tokens[b] for b in at.encode(r["conversations"][1]["value"])] for r in rows]


def _distinct_colour(i: int, rng: np.random.Generator) -> np.ndarray:
    """Eight images that differ globally (noise-only images look alike once pooled)."""
    colour = np.array([(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1]) * 200
    return np.clip(colour[None, None, :] + rng.integers(0, 50, (48, 64, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def overfit_run(fast_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("overfit")
    write_vla_dataset(d, "ds", 8, image_fn=lambda i, r: _distinct_colour(i, r),
                      action_fn=lambda i, r: r.uniform(-1, 1, 7), instruction_fn=lambda i: f"pick up the {OBJECTS[i]}")
    out = d / "run"
    proc = finetune(fast_tiny, d / "ds/train.jsonl", d, out, steps=150, save_steps=75)
    return d, out, proc


def test_overfit_and_plain_upstream_generation(overfit_run, fast_tiny):
    d, out, proc = overfit_run
    # training logged action metrics next to the loss
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert "action_accuracy_teacher_forced" in logged[-1] and "action_l1" in logged[-1]
    assert logged[-1]["train_tokens_seen"] > logged[0]["train_tokens_seen"] > 0
    gen = generate_plain_upstream(fast_tiny, out, d / "ds/train.jsonl", d)
    want = expected_tokens(d / "ds/train.jsonl")
    correct = 0
    for g, w in zip(gen, want):
        assert all(t.startswith("<ACTION_") for t in g[:7]), g
        assert g[7] == "<|im_end|>", g
        correct += sum(a == b for a, b in zip(g[:7], w))
    accuracy = correct / 56
    assert accuracy >= 0.9, f"action-token accuracy {accuracy:.2f} on the 8 training samples"


def test_checkpoints_carry_vla_files_and_resume(overfit_run, fast_tiny):
    d, out, _ = overfit_run
    for folder in [out, *sorted(out.glob("checkpoint-*"))]:
        assert (folder / "vla_action_tokenizer.json").exists(), folder
        stats = json.loads((folder / "dataset_statistics.json").read_text())
        assert set(stats) == {"ds"}
        added = json.loads((folder / "added_tokens.json").read_text())
        assert added["<ACTION_0>"] == 151646 and added["<ACTION_255>"] == 151901
        assert_same_policy(out, folder)  # a full fine-tune's checkpoint-N reads as its final save (one owner)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-150", "checkpoint-75"]
    # only the newest checkpoint keeps optimizer state (KEEP_OPTIMIZER=latest, the default)
    assert (out / "checkpoint-150/optimizer.pt").exists() and not (out / "checkpoint-75/optimizer.pt").exists()
    # resume (RESUME=auto, the default): same output dir, more steps -> continues from the last checkpoint
    proc = finetune(fast_tiny, d / "ds/train.jsonl", d, out, steps=152, save_steps=1000)
    assert f"resuming from {out / 'checkpoint-150'}" in proc.stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 152
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 152  # history carried over from checkpoint-150, not restarted
    tokens = [h["train_tokens_seen"] for h in logged]
    assert all(b > a for a, b in zip(tokens, tokens[1:]))  # counted on from the checkpoint's count, never down


def _colour_dataset(d: Path, n: int, split: str, seed: int):
    # action depends only on the dominant colour; one instruction for all
    table = np.array([[-0.8] * 6 + [0.0], [0.0] * 6 + [1.0], [0.8] * 6 + [0.0]])
    return write_vla_dataset(d, "colours", n, split=split, seed=seed, image_fn=lambda i, r: colour_image(r, i % 3),
                             action_fn=lambda i, r: table[i % 3])


@pytest.mark.parametrize("blind", [False, True], ids=["sees-image", "image-token-removed"])
def test_model_uses_its_images(fast_tiny, tmp_path, blind):
    _colour_dataset(tmp_path, 24, "train", seed=1)
    val = _colour_dataset(tmp_path, 12, "val", seed=2)
    out = tmp_path / "run"
    finetune(fast_tiny, tmp_path / "colours/train.jsonl", tmp_path, out, 90, *(["--vla_blind", "True"] if blind else []))
    gen = generate_plain_upstream(fast_tiny, out, val, tmp_path)
    want = expected_tokens(val)
    exact = np.mean([g[:7] == w for g, w in zip(gen, want)])
    # chance: one of three actions; a blind model can at best learn the marginal
    if blind:
        assert exact <= 0.5, f"blind model matched {exact:.2f} of held-out images: the test cannot tell image use apart"
    else:
        assert exact >= 0.6, f"model matched only {exact:.2f} of held-out images (chance 0.33)"


def test_guards_fail_fast(fast_tiny, tmp_path):
    write_vla_dataset(tmp_path, "ds", 2, image_fn=lambda i, r: colour_image(r, 0), action_fn=lambda i, r: [0.0] * 7)
    data = tmp_path / "ds/train.jsonl"
    p = finetune(fast_tiny, data, tmp_path, tmp_path / "a", 1, "--mm_use_im_patch_token", "True", check=False)
    assert p.returncode != 0 and "mm_use_im_patch_token" in p.stderr
    p = finetune(fast_tiny, data, tmp_path, tmp_path / "b", 1, "--version", "qwen_1_6", check=False)
    assert p.returncode != 0 and "not a conversation template" in p.stderr
    p = finetune(fast_tiny, data, tmp_path, tmp_path / "c", 1, "--model_max_length", "512", check=False)
    assert p.returncode != 0 and "model_max_length" in p.stderr and "730" in p.stderr
