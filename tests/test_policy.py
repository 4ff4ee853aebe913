"""VLAPolicy: predict_action equals hand-made constrained greedy decoding; OpenVLA's un-normalization.

The trained tiny checkpoint and the policy's predictions are built once per session and shared
with test_serve.py and test_eval.py (they import `trained_checkpoint` and `policy_results` from
here; both cache on disk under the session's base temp dir). Models are loaded in subprocesses:
the tiny tower resolves only with HF_HOME set before transformers is imported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import ROOT, requires_upstream, run_py, subprocess_env
from llava_vla_plugin.core.normalization import (UnnormKeyError, normalize_actions, resolve_unnorm_key,
                                            unnormalize_actions)

DS_B_STATS = {"q01": [-0.5, -0.1, 0.0, -3.0, -1.0, 0.2, 0.0], "q99": [0.5, 0.3, 2.0, 1.0, 1.0, 0.4, 1.0],
              "mask": [True, True, False, True, True, True, False]}
INSTRUCTIONS_B = ["put the red cup in the sink", "open the drawer"]


# ---- shared, cached on disk for the whole session ----------------------------------------------
def trained_checkpoint(tiny_model, tmp_path_factory) -> dict:
    """Two tiny datasets (different statistics), a checkpoint trained 2 steps through
    scripts/finetune_ov_vla.sh, and a copy of it whose statistics hold one dataset only."""
    root = tmp_path_factory.getbasetemp() / "vla_trained"
    info = {"root": root, "data": root / "data", "ckpt": root / "run-qwen", "single": root / "single-qwen",
            "env": subprocess_env(tiny_model.env())}
    if (root / "DONE").exists():
        return info
    if root.exists():
        shutil.rmtree(root)
    from llava_vla_plugin.testing.vla_samples import colour_image, write_mixture, write_vla_dataset

    data = info["data"]
    for split, n in (("train", 6), ("val", 3)):
        write_vla_dataset(data, "ds_a", n, split=split, image_fn=lambda i, r: colour_image(r, i % 3),
                          action_fn=lambda i, r: r.uniform(-1, 1, 7), seed=1 if split == "train" else 2)
        write_vla_dataset(data, "ds_b", n, split=split, image_fn=lambda i, r: colour_image(r, (i + 1) % 3, (40, 40)),
                          action_fn=lambda i, r: [*r.uniform(-1, 1, 6), float(i % 2)],
                          instruction_fn=lambda i: INSTRUCTIONS_B[i % 2], seed=3 if split == "train" else 4)
    stats_b = json.loads((data / "ds_b/dataset_statistics.json").read_text())
    stats_b["ds_b"]["action"].update(DS_B_STATS)
    (data / "ds_b/dataset_statistics.json").write_text(json.dumps(stats_b))
    mixture = write_mixture(data, [("ds_a", 1.0), ("ds_b", 1.0)])

    env = dict(info["env"], MODEL=str(tiny_model.llava_dir), VISION_TOWER=tiny_model.vision_tower, DATA=str(mixture),
               IMAGE_FOLDER=str(data), OUTPUT_DIR=str(info["ckpt"]), NUM_GPUS="0", BATCH_SIZE="2", MAX_STEPS="2",
               SAVE_STEPS="1000", IMAGE_ASPECT_RATIO="pad", NUM_WORKERS="0", MODEL_MAX_LENGTH="1024", LR="1e-4")
    proc = subprocess.run(["bash", "scripts/finetune_ov_vla.sh", "--gradient_checkpointing", "False",
                           "--save_strategy", "no"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    stats = json.loads((info["ckpt"] / "dataset_statistics.json").read_text())
    assert sorted(stats) == ["ds_a", "ds_b"]

    single = info["single"]  # the same weights, statistics of one dataset: unnorm_key may be omitted
    single.mkdir()
    for f in info["ckpt"].iterdir():
        if f.is_file() and f.name != "dataset_statistics.json":
            os.symlink(f, single / f.name)
    (single / "dataset_statistics.json").write_text(json.dumps({"ds_a": stats["ds_a"]}))
    (root / "DONE").write_text("ok")
    return info


# Runs in a subprocess (HF_HOME must point at the tiny tower before transformers is imported).
# The "hand" path uses only upstream's own inference recipe (conv template, tokenizer_image_token,
# process_images, model.generate), a constraint written here, and the formulas of OpenVLA.
POLICY_SCRIPT = r'''
import json, sys
import numpy as np, torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from llava.model.builder import load_pretrained_model
from llava.mm_utils import process_images, tokenizer_image_token
from llava.conversation import conv_templates
from llava.constants import IMAGE_TOKEN_INDEX
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.normalization import UnnormKeyError
from llava_vla_plugin.infer.policy import VLAPolicy

ckpt, single, data, out_path = sys.argv[1:5]
cases = json.loads(sys.argv[5])  # [[image path, instruction, unnorm_key], ...]
at = ActionTokenizer.load(ckpt)
stats = json.load(open(ckpt + "/dataset_statistics.json"))
tok, model, image_processor, _ = load_pretrained_model(ckpt, None, "llava_qwen", device_map="cpu", torch_dtype="float32")
model.eval()
first, end = int(at.token_ids[0]), tok.convert_tokens_to_ids("<|im_end|>")

class OnlyActionsThenEnd(LogitsProcessor):
    def __init__(self):
        self.calls = 0
    def __call__(self, ids, scores):
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        if self.calls < at.action_dim:
            allowed[first:first + at.n_bins] = True
        else:
            allowed[end] = True
        self.calls += 1
        return scores.masked_fill(~allowed, float("-inf"))

def hand(pil, instruction, key):
    conv = conv_templates["qwen_1_5"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat action should the robot take to " + instruction.lower() + "?")
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    images = [t for t in process_images([pil], image_processor, model.config)]  # a list, as the training collator
    with torch.inference_mode():
        out = model.generate(input_ids, images=images, image_sizes=[pil.size], modalities=["image"], do_sample=False,
                             num_beams=1, max_new_tokens=at.action_dim + 1, pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([OnlyActionsThenEnd()]))
    ids = out[0].tolist()
    assert len(ids) == at.action_dim + 1 and ids[-1] == end, ids
    normalized = at.decode(np.array(ids[:at.action_dim]) - first)
    s = stats[key]["action"]
    action = [0.5 * (normalized[d] + 1) * (s["q99"][d] - s["q01"][d]) + s["q01"][d] if s["mask"][d] else normalized[d]
              for d in range(at.action_dim)]
    return input_ids[0].tolist(), ids, action

res = {"cases": []}
hand_results = [hand(Image.open(p).convert("RGB"), instr, key) for p, instr, key in cases]
del model

policy = VLAPolicy.from_pretrained(ckpt, device="cpu", dtype="float32")
images = [Image.open(p).convert("RGB") for p, _, _ in cases]
for i, ((p, instr, key), (prompt, ids, action), pil) in enumerate(zip(cases, hand_results, images)):
    predicted = policy.predict_action(pil, instr, unnorm_key=key)
    case = {"image": p, "instruction": instr, "unnorm_key": key, "hand_ids": ids, "hand_action": action,
            "prompt_equal": prompt == policy.prompt_builder.prompt_ids(instr), "policy_action": predicted.tolist()}
    if i == 0:
        res["dtype"], res["shape"] = str(predicted.dtype), list(predicted.shape)
        case["policy_action_from_array"] = policy.predict_action(np.asarray(pil), instr, unnorm_key=key).tolist()
        case["policy_ids"] = policy.predict_action_ids([pil], [instr])[0].tolist()
    res["cases"].append(case)
res["last_logits_only"] = policy.backend.last_logits_only
# the restricted LM head (default) against the full one: the same ids for every case, in one batch
res["head_restricted"] = policy.head_restricted
ids_restricted = policy.predict_action_ids(images, [c[1] for c in cases]).tolist()
policy.restrict_head = False
res["full_vs_restricted_ids"] = [policy.predict_action_ids(images, [c[1] for c in cases]).tolist(), ids_restricted]
res["head_restricted_when_off"] = policy.head_restricted
policy.restrict_head = True
from llava_vla_plugin.infer.restricted_head import RestrictedHead
allowed = torch.tensor(policy.allowed_ids())
hidden = torch.randn(3, 5, policy.model.lm_head.in_features, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    full, sub = policy.model.lm_head(hidden), RestrictedHead(policy.model.lm_head, allowed)(hidden)
res["restricted_logits_max_diff"] = float((full[..., allowed] - sub[..., allowed]).abs().max())
keep = torch.zeros(full.shape[-1], dtype=torch.bool)
keep[allowed] = True
res["restricted_others_all_inf"] = bool(torch.isneginf(sub[..., ~keep]).all())
res["restricted_n_allowed"] = len(allowed)
prepared = policy.prepare(images[:1], [cases[0][1]])
with torch.inference_mode():
    embeds = policy.model.prepare_inputs_labels_for_multimodal(prepared.input_ids, None, prepared.attention_mask, None, None,
                                                               prepared.images, prepared.modalities, prepared.image_sizes)[4]
res["visual_tokens"] = embeds.shape[1] - (prepared.input_ids.shape[1] - 1)
# one generate call; images of two sizes, three instruction lengths (left padding), all with ds_b statistics
assert all(c[2] == "ds_b" for c in cases[1:])
res["batched"] = policy.predict_actions(images[1:], [c[1] for c in cases[1:]], unnorm_key="ds_b").tolist()
for name, key in (("no_key", None), ("bad_key", "nope")):
    try:
        policy.predict_action(images[0], "x", unnorm_key=key)
        res[name] = None
    except UnnormKeyError as e:
        res[name] = str(e)
# The checkpoint's generation config must not leak in: make it sample wildly, predictions stay greedy.
policy.model.generation_config = GenerationConfig(do_sample=True, temperature=50.0, top_k=3, top_p=0.3,
                                                  repetition_penalty=5.0, max_new_tokens=2)
p0, instr0, key0 = cases[0]
res["after_sampling_config"] = [policy.predict_action(images[0], instr0, unnorm_key=key0).tolist() for _ in range(3)]
del policy
policy1 = VLAPolicy.from_pretrained(single)
res["single_no_key"] = policy1.predict_action(images[0], instr0).tolist()
json.dump(res, open(out_path, "w"))
'''


def policy_results(tiny_model, tmp_path_factory) -> tuple[dict, dict]:
    """Hand decoding and VLAPolicy predictions for a few (image, instruction, unnorm_key) cases."""
    info = trained_checkpoint(tiny_model, tmp_path_factory)
    out = info["root"] / "policy_results.json"
    if not out.exists():
        data = info["data"]
        cases = [[str(data / "ds_a/images/val/000000/0000.jpg"), "pick up the block", "ds_a"],
                 [str(data / "ds_b/images/val/000000/0000.jpg"), INSTRUCTIONS_B[0], "ds_b"],
                 [str(data / "ds_b/images/val/000001/0000.jpg"), INSTRUCTIONS_B[1], "ds_b"],
                 [str(data / "ds_a/images/val/000001/0000.jpg"), "Pick Up The Block", "ds_b"]]
        script = info["root"] / "policy_script.py"
        script.write_text(POLICY_SCRIPT)
        proc = run_py([str(script), str(info["ckpt"]), str(info["single"]), str(data), str(out), json.dumps(cases)],
                      env=info["env"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return info, json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    return policy_results(tiny_model, tmp_path_factory)[1]


# ---- the trained checkpoint --------------------------------------------------------------------
@requires_upstream
def test_predict_action_equals_hand_decoded_greedy_tokens(results):
    for case in results["cases"]:
        assert case["prompt_equal"], case  # exactly upstream's qwen_1_5 prompt with the image placeholder
        assert case["policy_action"] == case["hand_action"]  # bit-equal: same tokens, same formula
    first = results["cases"][0]
    assert first["policy_ids"] == first["hand_ids"][:7] and first["hand_ids"][7] == 151645
    assert first["policy_action_from_array"] == first["hand_action"]  # HxWx3 uint8 array == PIL image
    assert results["dtype"] == "float64" and results["shape"] == [7]
    # the training layout (pad + spatial_unpad: 729 patches + the image-newline token), and the policy's
    # last-position LM head (default) agrees with upstream's forward used by the hand path
    assert results["visual_tokens"] == 730 and results["last_logits_only"] is True
    # issue 23 item 2: those actions came from the restricted LM head (257 rows: 256 bins + the end), the hand
    # path's from the full one; the full head in the policy gives the same ids, and the allowed logits agree
    assert results["head_restricted"] is True and results["head_restricted_when_off"] is False
    full_ids, restricted_ids = results["full_vs_restricted_ids"]
    assert full_ids == restricted_ids and len(full_ids) == 4
    assert results["restricted_n_allowed"] == 257 and results["restricted_others_all_inf"]
    assert results["restricted_logits_max_diff"] <= 1e-5, results["restricted_logits_max_diff"]


@requires_upstream
def test_batched_predictions_equal_single_ones(results):
    # different instruction lengths and image sizes: the batch is left-padded
    assert results["batched"] == [c["hand_action"] for c in results["cases"][1:]]


@requires_upstream
def test_unnorm_key_rules(results):
    assert "pass unnorm_key" in results["no_key"] and "['ds_a', 'ds_b']" in results["no_key"]
    assert "unknown unnorm_key 'nope'" in results["bad_key"] and "['ds_a', 'ds_b']" in results["bad_key"]
    # one dataset in the statistics: the key may be omitted (same weights, ds_a statistics)
    assert results["single_no_key"] == results["cases"][0]["hand_action"]


@requires_upstream
def test_generation_config_of_checkpoint_does_not_leak(results):
    for action in results["after_sampling_config"]:
        assert action == results["cases"][0]["hand_action"]


# ---- pure parts (no upstream needed) -----------------------------------------------------------
def test_unnormalize_matches_hand_computation_with_mask():
    stats = {"q01": DS_B_STATS["q01"], "q99": DS_B_STATS["q99"], "mask": DS_B_STATS["mask"]}
    a = np.array([-1.0, 1.0, 0.25, 0.0, -0.5, 0.75, 0.9])
    expected = []
    for d in range(7):
        lo, hi = stats["q01"][d], stats["q99"][d]
        expected.append((a[d] + 1) / 2 * (hi - lo) + lo if stats["mask"][d] else a[d])
    got = unnormalize_actions(a, stats)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert got[0] == -0.5 and got[1] == pytest.approx(0.3) and got[2] == 0.25 and got[6] == 0.9  # masked: untouched
    # batched, and a missing mask means every dimension
    np.testing.assert_allclose(unnormalize_actions(np.stack([a, a]), stats), [expected, expected])
    no_mask = unnormalize_actions(a, {"q01": stats["q01"], "q99": stats["q99"]})
    assert no_mask[2] == (0.25 + 1) / 2 * 2.0 and no_mask[6] == (0.9 + 1) / 2
    # round trip with the forward map inside [q01, q99]
    x = unnormalize_actions(np.linspace(-0.9, 0.9, 7), stats)
    np.testing.assert_allclose(normalize_actions(x, stats), np.where(stats["mask"], np.linspace(-0.9, 0.9, 7), x), atol=1e-7)
    with pytest.raises(ValueError, match="do not match"):
        unnormalize_actions(np.zeros(6), stats)


def test_resolve_unnorm_key():
    two = {"b": {}, "a": {}}
    assert resolve_unnorm_key({"only": {}}, None) == "only"
    assert resolve_unnorm_key(two, "a") == "a"
    with pytest.raises(UnnormKeyError, match=r"2 datasets; pass unnorm_key, one of: \['a', 'b'\]"):
        resolve_unnorm_key(two, None)
    with pytest.raises(UnnormKeyError, match=r"unknown unnorm_key 'c'.*\['a', 'b'\]"):
        resolve_unnorm_key(two, "c")


def test_act_and_the_vla_eval_server_share_one_key_rule():
    """OpenVLA's LIBERO checkpoints hold `<suite>_no_noops`: /act (VLAPolicy) accepts `<suite>` as the vla-eval
    server does (it refused it before: the fallback lived in the server alone); an exact key still wins."""
    from llava_vla_plugin.core.normalization import action_stats
    from llava_vla_plugin.infer.vla_eval_server import unnorm_key_with_fallback

    stats = {"libero_spatial_no_noops": {"action": {"q01": [0.0], "q99": [1.0]}},
             "libero_goal": {"action": {"q01": [2.0], "q99": [3.0]}}, "libero_goal_no_noops": {"action": {}}}
    for key, want in (("libero_spatial", "libero_spatial_no_noops"), ("libero_goal", "libero_goal")):
        assert resolve_unnorm_key(stats, key) == unnorm_key_with_fallback(stats, key) == want
    assert action_stats(stats, "libero_spatial") == {"q01": [0.0], "q99": [1.0]}
    with pytest.raises(UnnormKeyError, match="libero_10"):
        resolve_unnorm_key(stats, "libero_10")


def test_action_constraint_masks_logits():
    import torch

    from llava_vla_plugin.infer.policy import ActionConstraint

    proc = ActionConstraint(first_action_id=10, n_bins=4, end_id=2, action_dim=2)
    scores = torch.arange(20, dtype=torch.float32).repeat(2, 1)  # the global argmax (19) is no action token
    ids = torch.zeros((2, 0), dtype=torch.long)  # upstream generates from embeddings: no prompt ids
    for step in range(3):
        out = proc(ids, scores.clone())
        allowed = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert allowed == ([10, 11, 12, 13] if step < 2 else [2])
        assert torch.equal(out[:, allowed], scores[:, allowed])
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
    assert ids[0].tolist() == [13, 13, 2]


def test_image_inputs_are_checked():
    from PIL import Image

    from llava_vla_plugin.infer.policy import ImageInputError, to_pil

    assert to_pil(np.zeros((4, 5, 3), np.uint8)).size == (5, 4)
    assert to_pil(Image.new("L", (3, 2))).mode == "RGB"
    for bad, msg in ((np.zeros((4, 5), np.uint8), "shape"), (np.zeros((4, 5, 4), np.uint8), "shape"),
                     (np.zeros((4, 5, 3), np.float32), "uint8"), ([[0]], "PIL image")):
        with pytest.raises(ImageInputError, match=msg):
            to_pil(bad)


def test_package_exports_policy_lazily():
    code = ("import sys, llava_vla_plugin as p; assert 'torch' not in sys.modules; "
            "from llava_vla_plugin import VLAPolicy; assert 'torch' in sys.modules; print(VLAPolicy.__name__)")
    proc = run_py(["-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == "VLAPolicy", proc.stderr[-2000:]
