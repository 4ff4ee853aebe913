"""Camera views and the robot state as training options (issue 22 items 2 and 6; core/inputs.py).

- The prompt of a two-view, state-conditioned sample: upstream's own ids for "<image>\\n<image>\\n{prompt}" (its
  preprocess_qwen), the state as action-bin tokens after the instruction, labels on the answer alone.
- The state's tokens: OpenVLA's BOUNDS_Q99 map with the proprio statistics, then the action bins; statistics over
  zeros (OpenVLA's file without proprio) are refused.
- The dataset: every view one `pad` tile, a missing wrist view OpenVLA's zero image (counted), a missing state file
  refused with the file and the fix; bad launcher values refused before anything loads.
- The wrist view shows it matters, on CPU, through the launcher's argv and VLAPolicy: a task whose dims 0-2 follow
  only the wrist view's colour and dims 3-5 only the state (the primary view is noise). The run with the wrist view
  beats the primary-only run on dims 0-2 by a wide margin; the primary-only ablation stays at the error of
  predicting the mean (0.5). A policy trained with the wrist view and the state (a short run) records them and
  refuses a request without either, naming it.
- Not shown here: the state mattering. The tiny model learns no text cue within a CPU budget: measured 2026-12-05,
  parallel_l1, dims 3-5 held-out error 0.49-0.51 (chance 0.5) with the state after 60 and 150 steps (LR 3e-3 and
  1e-2, with and without images), and the same for an instruction cue ("move left/stay here/move right") after
  60 steps; bins after 100 steps likewise. The colour of 730 visual tokens it learns in 60.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, UPSTREAM_REASON, requires_upstream, subprocess_env, upstream_available
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.inputs import (InputConfig, InputConfigError, discretize_state, parse_cameras,
                                          proprio_statistics, state_text)
from llava_vla_plugin.core.prompt import IGNORE_INDEX, IMAGE_TOKEN_INDEX, VLAPromptBuilder

STATS = {"ds": {"proprio": {"q01": [-1.0, 0.0, 10.0], "q99": [1.0, 2.0, 10.0], "min": [-2, 0, 10], "max": [2, 3, 10],
                            "source": "state"}}}


@pytest.fixture(scope="module")
def tok_at(qwen_tokenizer):
    tok = copy.deepcopy(qwen_tokenizer)
    at = ActionTokenizer()
    at.add_to_tokenizer(tok)
    return tok, at


def test_state_text_follows_openvla_normalization_and_openpi_bins():
    entry = STATS["ds"]["proprio"]
    raw = np.array([0.5, 3.0, 10.0])
    # 2*(x-q01)/(q99-q01+1e-8)-1 clipped: 0.5 -> 0.5, 3 -> 1 (clipped), a constant dim (min == max) -> 0
    normalized = np.array([0.5, 1.0, 0.0])
    # openpi FASTTokenizer.tokenize: np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1
    expected = np.digitize(normalized, bins=np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(raw, entry).tolist() == expected.tolist() == [192, 255, 128]
    assert discretize_state([-5.0, -5.0, 10.0], entry).tolist() == [0, 0, 128]  # clipped to -1: bin 0
    assert state_text([192, 255, 128]) == "\nState: 192 255 128;"
    with pytest.raises(ValueError, match="has 2 values"):
        discretize_state([0.0, 1.0], entry)
    # OpenVLA's zero column for a None state key (LIBERO: 9 values in training, 8 from vla-eval's LIBERO): a state
    # without it gets the zero back where training had it; any other width is refused, naming the padding
    padded = {**entry, "padding": [2]}
    assert discretize_state([0.5, 3.0], padded).tolist() == discretize_state([0.5, 3.0, 0.0], padded).tolist()
    with pytest.raises(ValueError, match=r"has 1 values.* 3 \(or 2 without the padding columns \[2\]\)"):
        discretize_state([0.5], padded)
    zeros = {"ds": {"proprio": {"q01": [0.0] * 3, "q99": [0.0] * 3}}}
    with pytest.raises(InputConfigError, match="computed over zeros"):
        proprio_statistics(zeros, "ds", "here")
    with pytest.raises(InputConfigError, match="no proprio statistics"):
        proprio_statistics({"ds": {}}, "ds", "here")


def test_camera_option():
    assert parse_cameras("wrist, primary") == ("primary", "wrist")
    for bad, msg in (("primary,top", "unknown view"), ("wrist", "primary .* is required"), ("primary,primary", "twice")):
        with pytest.raises(InputConfigError, match=msg):
            parse_cameras(bad)
    assert InputConfig().is_default and not InputConfig(("primary", "wrist")).is_default


def test_two_view_state_prompt(tok_at):
    tok, at = tok_at
    b = VLAPromptBuilder(tok, at, n_views=2).with_state(state_text([140, 102]))
    action = [0.1, -0.5, 1.0, -1.0, 0.0, 0.3, 1.0]
    ids, labels = b.build("Open the drawer", action)
    assert (ids == IMAGE_TOKEN_INDEX).sum() == 2
    assert labels[labels != IGNORE_INDEX].tolist() == [*at.encode_to_ids(action).tolist(), 151645]
    # the whole prompt as text, tokenized at once, gives the same ids (the pieces are split at special tokens)
    t2 = copy.deepcopy(tok)
    t2.add_tokens(["<image>"], special_tokens=True)
    whole = [IMAGE_TOKEN_INDEX if i == t2.convert_tokens_to_ids("<image>") else i
             for i in t2(b.prompt_text("Open the drawer"), add_special_tokens=False)["input_ids"]]
    assert ids[:len(whole)].tolist() == whole
    assert "<image>\n<image>\nWhat action should the robot take to open the drawer?\nState: 140 102;<|im_end|>" in \
        b.prompt_text("Open the drawer")
    # the builder without the state is untouched (with_state binds a copy)
    assert VLAPromptBuilder(tok, at, n_views=2).state == ""


@requires_upstream
def test_two_view_prompt_is_upstreams_multi_image_prompt(tok_at):
    """What plain upstream makes of the same conversation (two images, the state as text) is our ids."""
    from llava.train.train import preprocess_qwen

    tok, at = tok_at
    b = VLAPromptBuilder(tok, at, n_views=2).with_state(state_text([0, 17, 255]))
    action = np.linspace(-1, 1, 7)
    ids, _ = b.build("stack the blocks", action)
    src = [[{"from": "human", "value": "<image>\n<image>\nWhat action should the robot take to stack the blocks?\nState: 0 17 255;"},
            {"from": "gpt", "value": "".join(at.tokens[k] for k in at.encode(action))}]]
    np.testing.assert_array_equal(preprocess_qwen(src, tok, has_image=True)["input_ids"][0].numpy(), ids)


# ---- the task ---------------------------------------------------------------------------------------------------
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]])
LEVELS = (-0.75, 0.0, 0.75)  # normalized action values (the converted format's assistant turn)


def _noise(i, rng):
    return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def _wrist(i, rng):
    img = np.clip(COLOURS[i % 3][None, None] + rng.integers(-20, 21, (48, 64, 3)), 0, 255)
    return img.astype(np.uint8)


def _state(i, rng):  # 8-d, as LIBERO's: every dimension near the class (i // 3) % 3 - 1, with noise
    return list((i // 3) % 3 - 1.0 + rng.normal(0, 0.05, 8))


def _action(i, rng):
    return [LEVELS[i % 3]] * 3 + [LEVELS[(i // 3) % 3]] * 3 + [0.0]


@pytest.fixture(scope="module")
def input_task(tmp_path_factory):
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    d = tmp_path_factory.mktemp("inputs_task")
    for split, n, seed in (("train", 45, 1), ("val", 18, 2)):
        write_vla_dataset(d, "views", n, split=split, image_fn=_noise, action_fn=_action, wrist_fn=_wrist,
                          proprio_fn=_state, seed=seed)
    return d


@pytest.fixture(scope="module")
def input_runs(input_task, tmp_path_factory):
    if not upstream_available():
        pytest.skip(UPSTREAM_REASON)
    from llava_vla_plugin.apps.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("input_runs")
    tiny = build_tiny_model(root / "tiny", vision_layers=1)
    # One run per input and the ablation, `bins` at a constant LR as tests/test_action_chunks.py's token heads (120
    # steps at 3e-3). Measured 2026-12-05 (constant grey primary): bins with the state 0.004 held-out error on the
    # state's dims after 120 steps (44 s); parallel_l1 with the state stays at chance (0.50 after 120 steps at 1e-3,
    # 0.26 after 200 at 3e-3): the state's few text tokens among 729 image tokens per view are found by the token
    # head's cross-entropy first. both: a short parallel_l1 run, for its checkpoint's files and the refusals.
    runs = {"wrist": {"CAMERAS": "primary,wrist"}, "state": {"PROPRIO": "1"}, "neither": {},
            "both": {"CAMERAS": "primary,wrist", "PROPRIO": "1", "MAX_STEPS": "2", "ACTION_REPR": "parallel_l1"}}
    jobs = []
    for name, extra in runs.items():
        env = {**tiny.env(), "MODEL": str(tiny.llava_dir), "VISION_TOWER": tiny.vision_tower,
               "DATA": str(input_task / "views/train.jsonl"), "IMAGE_FOLDER": str(input_task), "OUTPUT_DIR": str(root / name),
               "NUM_GPUS": "0", "BATCH_SIZE": "6", "MAX_STEPS": "120", "SAVE_STEPS": "1000", "LR": "3e-3",
               "IMAGE_ASPECT_RATIO": "pad", "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "2048", "ACTION_REPR": "bins",
               **extra}
        # overrides as tests/test_action_chunks.py says why (speed on 2 cores; the tower is a patch embedding;
        # a constant LR for the token head)
        args = ["--gradient_checkpointing", "False", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
                "--seed", "0", "--optim", "adamw_torch_fused", "--lr_scheduler_type", "constant"]
        jobs.append({"env": env, "args": args, "predict": {"val": str(input_task / "views/val.jsonl"),
                                                           "folder": str(input_task), "max_step": 0}})
    path = root / "jobs.json"
    path.write_text(json.dumps(jobs))
    proc = subprocess.run([os.sys.executable, "-m", "llava_vla_plugin.testing.inprocess_train", str(path)],
                          env=subprocess_env(tiny.env()), capture_output=True, text=True, timeout=1500, cwd=ROOT)
    out = {}
    for name in runs:
        f = root / name / "inprocess_result.json"
        result = json.loads(f.read_text()) if f.exists() else {"error": proc.stdout[-3000:] + proc.stderr[-6000:]}
        assert "error" not in result, result["error"]
        out[name] = result
    out["_root"], out["_log"], out["_env"] = root, proc.stderr, tiny.env()
    return out


def _errors(result, val: Path):
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    target = np.asarray([r["conversations"][1]["value"] for r in rows])
    pred = np.asarray(result["normalized"])[:, 0]
    err = np.abs(pred - target)
    return float(err[:, 0:3].mean()), float(err[:, 3:6].mean())


def test_each_input_matters(input_runs, input_task):
    """Dims 0-2 follow the wrist view's colour, dims 3-5 the state (the primary image is noise): each input's model
    gets its dims on held-out samples, and stays at chance on the dims whose input it lacks, as the ablation does."""
    val = input_task / "views/val.jsonl"
    errs = {name: _errors(input_runs[name], val) for name in ("wrist", "state", "neither")}
    print("held-out mean |error| (wrist dims, state dims):", errs)
    # chance: the best constant guess of {-0.75, 0, 0.75} (0) errs by 0.5 on average
    assert errs["wrist"][0] < 0.1 and errs["state"][1] < 0.1
    assert min(errs["wrist"][1], errs["state"][0], *errs["neither"]) > 0.4


REFUSALS = """
import json, sys
from PIL import Image
from llava_vla_plugin.infer.policy import VLAPolicy
policy = VLAPolicy.from_pretrained(sys.argv[1], device="cpu", dtype="float32")
img = Image.open(sys.argv[2])
out = {}
for name, kwargs in (("no_wrist", {"proprio": [0.0] * 8}), ("no_state", {"wrist_image": img}),
                     ("short_state", {"wrist_image": img, "proprio": [0.0] * 7})):
    try:
        policy.predict_action(img, "pick up the block", unnorm_key="views", **kwargs)
        out[name] = "accepted"
    except ValueError as e:
        out[name] = f"{type(e).__name__}: {e}"
out["shape"] = list(policy.predict_action(img, "pick up the block", unnorm_key="views", wrist_image=img,
                                          proprio=[0.0] * 8).shape)
out["prompt"] = policy.prompt_builder.with_state("\\nState: 1 2;").prompt_text("x")
# /act with OpenVLA-OFT's deploy.py fields (full_image, wrist_image, state), and without them
import json_numpy, numpy as np
from fastapi.testclient import TestClient
from llava_vla_plugin.infer.serve import create_app
client = TestClient(create_app(policy))
arr = np.asarray(img.convert("RGB"))
ok = client.post("/act", content=json_numpy.dumps({"full_image": arr, "wrist_image": arr, "state": [0.0] * 8,
                                                   "instruction": "pick up the block", "unnorm_key": "views"}))
out["act_ok"] = [ok.status_code, list(json_numpy.loads(ok.text).shape)]
bad = client.post("/act", content=json_numpy.dumps({"image": arr, "state": [0.0] * 8, "instruction": "pick up the block"}))
out["act_no_wrist"] = [bad.status_code, bad.json()["error"]]
# the vla-eval server: LIBERO's observation (agentview + wrist, 8-d states), and one without the wrist view
from vla_eval.model_servers.base import SessionContext
from llava_vla_plugin.infer.vla_eval_server import LlavaVLAModelServer, ObservationError
server = LlavaVLAModelServer(policy, unnorm_key="views")
out["spec"] = sorted(server.get_observation_spec())
ctx = SessionContext(session_id="s", episode_id="e")
obs = {"images": {"agentview": arr, "wrist": arr}, "task_description": "pick up the block", "states": np.zeros(8)}
out["eval_ok"] = list(server.predict(obs, ctx)["actions"].shape)
try:
    server.predict({"images": {"agentview": arr}, "task_description": "pick up the block", "states": np.zeros(8)}, ctx)
    out["eval_no_wrist"] = "accepted"
except ObservationError as e:
    out["eval_no_wrist"] = str(e)
print("RESULT" + json.dumps(out))
"""


def test_checkpoint_records_its_inputs_and_refuses_requests_without_them(input_runs, input_task):
    root = input_runs["_root"]
    assert json.loads((root / "both" / "vla_inputs.json").read_text()) == {"cameras": ["primary", "wrist"], "proprio": True,
                                                                             "proprio_dim": 8}
    assert not (root / "neither" / "vla_inputs.json").exists()  # the default: a checkpoint as before
    proc = subprocess.run([os.sys.executable, "-c", REFUSALS, str(root / "both"), str(input_task / "views/images/val/000000/0000.jpg")],
                          env=subprocess_env(input_runs["_env"]), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert "RESULT" in proc.stdout, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["no_wrist"].startswith("MissingInputError") and "wrist camera" in out["no_wrist"]
    assert out["no_state"].startswith("MissingInputError") and "robot state" in out["no_state"]
    assert "has 7 values" in out["short_state"]
    assert out["shape"] == [7]
    assert out["prompt"].count("<image>") == 2
    assert out["act_ok"] == [200, [7]]
    assert out["act_no_wrist"][0] == 400 and "wrist camera" in out["act_no_wrist"][1]
    assert out["spec"] == ["agentview", "language", "state", "wrist"]
    assert out["eval_ok"] == [7]
    assert "send_wrist_image: true" in out["eval_no_wrist"]


def test_dataset_views_and_missing_inputs(input_task, tmp_path, tiny_model):
    """The dataset's items: two `pad` tiles; a dataset without the wrist view trains on OpenVLA's zero image (counted);
    PROPRIO=1 on data without a state file stops with the file and the fix."""
    import shutil

    from types import SimpleNamespace

    import torch
    from transformers import AutoTokenizer

    from llava_vla_plugin.train.dataset import VLADataset
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    d = tmp_path / "conv"
    shutil.copytree(input_task / "views", d / "views")
    write_vla_dataset(d, "nowrist", 4, image_fn=_noise, action_fn=_action)  # no wrist view, no state
    (d / "mix.yaml").write_text("datasets:\n- {json_path: views/train.jsonl, weight: 1}\n- {json_path: nowrist/train.jsonl, weight: 1}\n")
    tok = AutoTokenizer.from_pretrained(tiny_model.llava_dir)
    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    args = SimpleNamespace(image_folder=str(d), image_processor=SigLipImageProcessor(), image_aspect_ratio="anyres_max_9",
                           is_multimodal=True, early_mix_text=False, vla_cameras="primary,wrist", vla_proprio=False,
                           image_grid_pinpoints="(1x1),...,(6x6)", mm_use_im_start_end=False)
    ds = VLADataset(str(d / "mix.yaml"), tok, args)
    assert ds.missing_views == {"nowrist": 4}
    item = ds[0]
    assert [im[0].shape for im in item["image"]] == [torch.Size([3, 384, 384])] * 2  # each view one pad tile
    last = ds[len(ds) - 1]  # a nowrist frame: the second view is the zero image (pad of black = the mean colour tile)
    black = ds.process_pil(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 48)), "pad")
    assert torch.equal(last["image"][1][0], black)
    args.vla_proprio = True
    with pytest.raises(FileNotFoundError, match=r"nowrist/train_proprio.npz does not exist.*Re-convert"):
        VLADataset(str(d / "mix.yaml"), tok, args)


def test_launcher_refuses_bad_input_options(tmp_path, input_task):
    base = {"DATA": str(input_task / "views/train.jsonl"), "IMAGE_FOLDER": str(input_task), "NUM_GPUS": "0",
            "OUTPUT_DIR": str(tmp_path / "out")}
    for extra, msg in (({"CAMERAS": "primary,top"}, "CAMERAS (--vla_cameras): CAMERAS=primary,top: unknown view"),
                       ({"PROPRIO": "yes"}, "PROPRIO=yes: expected 0")):
        proc = subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh")], env=subprocess_env({**base, **extra}),
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "out").exists()


# ---- the LIBERO presets and the four-suite command (item 5; not run here: 8 GPUs and LIBERO) -----------------------
@pytest.mark.parametrize("preset, expect", [
    ("libero_oft_inputs", {"--vla_cameras": "primary,wrist", "--vla_proprio": "True", "--vla_action_repr": "parallel_l1",
                           "--vla_horizon": "8", "--vla_image_aug": "True", "--lora_enable": "True", "--lora_r": "32",
                           "--lora_alpha": "16", "--lora_dropout": "0.0", "--learning_rate": "5e-4"}),
    ("libero_openvla", {"--vla_action_repr": "bins", "--vla_horizon": "1", "--vla_image_aug": "True"})])
def test_libero_presets_reach_the_trainer(preset, expect, input_task, tmp_path):
    """CONFIG=<preset> through the real launcher (the training exec recorded, preflight run for real); the data
    paths are the test's (the environment wins over the file)."""
    from llava_vla_plugin.testing.inprocess_train import launcher_argv

    argv = launcher_argv({"CONFIG": str(ROOT / "configs/presets" / f"{preset}.yaml"), "NUM_GPUS": "0",
                          "DATA": str(input_task / "views/train.jsonl"), "IMAGE_FOLDER": str(input_task),
                          "OUTPUT_DIR": str(tmp_path / "out")}, [])
    got = {flag: argv[len(argv) - 1 - argv[::-1].index(flag) + 1] for flag in expect if flag in argv}
    assert got == expect
    if preset == "libero_openvla":
        assert "--vla_cameras" not in argv and "--vla_proprio" not in argv  # the default inputs: flags left out


def test_four_suite_command_dry_run(tmp_path):
    ckpt = tmp_path / "ov-vla-libero"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "dataset_statistics.json").write_text(json.dumps({f"{s}_no_noops": {} for s in
                                                              ("libero_spatial", "libero_object", "libero_goal", "libero_10")}))
    proc = subprocess.run([os.sys.executable, "-m", "llava_vla_plugin.experiments.closed_loop_study", "--checkpoint",
                           str(ckpt), "--spec", str(ROOT / "configs/closed_loop/libero_4_suites.yaml"), "--dry-run"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    serves = [line for line in proc.stderr.splitlines() if "would serve" in line]
    assert [next(s for s in ("libero_spatial", "libero_object", "libero_goal", "libero_10") if f"--unnorm-key {s}" in line)
            for line in serves] == ["libero_spatial", "libero_object", "libero_goal", "libero_10"]
    runs = [line for line in proc.stderr.splitlines() if "would run" in line]
    assert len(runs) == 4 and all("send_wrist_image=true" in r and "send_state=true" in r for r in runs)
    assert f"would write: {ckpt / 'closed_loop' / 'report.json'}" in proc.stderr
    assert not (ckpt / "closed_loop").exists()
