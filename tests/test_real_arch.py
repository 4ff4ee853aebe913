"""The real llava-onevision-qwen2-0.5b-ov architecture (random weights) trains and predicts on CPU;
the 7B architecture's shapes and parameter count are checked on the meta device.

The 0.5B test runs in its own process (about 2 minutes, ~6 GB peak): bf16 weights, as real training
uses, because fp32 weights + gradients of 0.9B parameters (7 GB) beside the other tests' processes
would not fit this 24 GB machine; the CPU has AMX, so bf16 is also the fast path. One forward +
backward (no optimizer state), one predict_action, with `pad` and batch 1; the visual-token counts
are those of the features the model's own prepare_inputs_labels_for_multimodal produces.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import requires_upstream, run_py, subprocess_env
from llava_vla_plugin.testing.onevision_configs import DOCUMENTED_VISUAL_TOKENS, LLM_PARAMETERS

REAL_ARCH_SCRIPT = r'''
import json, os, sys, time
import numpy as np, torch
from PIL import Image

def rss_peak_mb():  # VmHWM since the last reset
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from llava_vla_plugin.train.register import register
register()
from llava.mm_utils import process_images
from llava_vla_plugin.infer.policy import VLAPolicy
from llava_vla_plugin.core.prompt import IMAGE_TOKEN_INDEX, VLAPromptBuilder
from llava_vla_plugin.testing.onevision_configs import build_onevision, example_statistics, publish_random_siglip

torch.set_num_threads(2)
out = {}
t0 = time.time()
publish_random_siglip(__import__("pathlib").Path(os.environ["HF_HOME"]), dtype=torch.bfloat16)
b = build_onevision("0.5b", "pad", dtype=torch.bfloat16)
model, tok = b.model, b.tokenizer
out["build_s"] = time.time() - t0
out["build_peak_mb"] = rss_peak_mb()
out["parameters"] = sum(p.numel() for p in model.parameters())
out["tower_layers"] = len(model.get_vision_tower().vision_tower.vision_model.encoder.layers)
rng = np.random.default_rng(0)
frames = {(256, 320): Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)),
          (480, 640): Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))}

# visual tokens = positions after prepare_inputs_labels_for_multimodal minus the text ids
text = tok("hello world", add_special_tokens=False)["input_ids"]
ids = torch.tensor([[*text, IMAGE_TOKEN_INDEX, *text]])
counts = {}
with torch.inference_mode():
    for mode, size in (("pad", (480, 640)), ("anyres_max_9", (256, 320)), ("anyres_max_9", (480, 640))):
        model.config.image_aspect_ratio = mode
        pil = frames[size]
        px = process_images([pil], b.image_processor, model.config)
        res = model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids), None, None,
                                                         [px[0].to(torch.bfloat16)], ["image"], [pil.size])
        counts[f"{mode} {size[0]}x{size[1]}"] = {"tokens": res[4].shape[1] - 2 * len(text), "crops": int(px[0].shape[0]) if px[0].ndim == 4 else 1}
model.config.image_aspect_ratio = "pad"
out["visual_tokens"] = counts

# one training forward + backward, pad, batch 1 (the plugin's sparse-head forward, as VLATrainer runs it)
builder = VLAPromptBuilder(tok, b.action_tokenizer)
input_ids, labels = builder.build("put the cup in the sink", rng.uniform(-1, 1, 7))
pil = frames[(480, 640)]
px = process_images([pil], b.image_processor, model.config)[0].to(torch.bfloat16)
model.train()
model.requires_grad_(True)  # mm_tunable_parts: tower, projector and LM all train in OneVision fine-tuning
reset_peak()
t0 = time.time()
res = model(input_ids=torch.tensor([input_ids]), attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            labels=torch.tensor([labels]), images=[px], image_sizes=[pil.size], modalities=["image"])
res.loss.backward()
out["train_step_s"] = time.time() - t0
out["train_peak_mb"] = rss_peak_mb()
out["loss"] = float(res.loss)
out["logits_shape"] = list(res.logits.shape)
out["sequence_positions"] = len(input_ids) - 1 + counts["pad 480x640"]["tokens"]
grad_norm = lambda m: float(sum(p.grad.float().norm() ** 2 for p in m.parameters() if p.grad is not None) ** 0.5)
out["grad_norm"] = {"vision_tower": grad_norm(model.get_vision_tower()), "projector": grad_norm(model.get_model().mm_projector),
                    "language_model": grad_norm(model.get_model().layers)}
model.zero_grad(set_to_none=True)
model.eval()

policy = VLAPolicy.from_upstream_model(model, tok, b.image_processor, b.action_tokenizer, example_statistics())
reset_peak()
t0 = time.time()
action = policy.predict_action(np.asarray(pil), "put the cup in the sink", unnorm_key="bridge_orig")
out["predict_s"] = time.time() - t0
out["predict_peak_mb"] = rss_peak_mb()
out["action"] = [float(a) for a in action]
print("RESULT " + json.dumps(out))
'''


@requires_upstream
@pytest.mark.slow
def test_real_05b_trains_and_predicts_on_cpu(tmp_path):
    env = subprocess_env({"HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "2"})
    proc = run_py(["-c", REAL_ARCH_SCRIPT], env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line[len("RESULT "):])
    print(json.dumps(r, indent=1))  # the numbers BENCHMARKS.md records (pytest -s shows them)

    # 494,032,768 LM + 1,836,800 projector + 397,747,744 tower (26 layers) + 896 image_newline
    assert r["parameters"] == LLM_PARAMETERS["0.5b"] + 1_836_800 + 397_747_744 + 896
    assert r["tower_layers"] == 26
    vt = r["visual_tokens"]
    assert vt["pad 480x640"]["tokens"] == DOCUMENTED_VISUAL_TOKENS[("pad", None)]
    assert vt["anyres_max_9 256x320"]["tokens"] == DOCUMENTED_VISUAL_TOKENS[("anyres_max_9", (256, 320))]
    assert vt["anyres_max_9 480x640"]["tokens"] == DOCUMENTED_VISUAL_TOKENS[("anyres_max_9", (480, 640))]
    assert [vt[k]["crops"] for k in ("pad 480x640", "anyres_max_9 256x320", "anyres_max_9 480x640")] == [1, 2, 5]

    assert r["logits_shape"] == [8, 151936]  # sparse head: 7 action tokens + <|im_end|>
    assert 8 < r["loss"] < 16  # random weights: about ln(151936) = 11.9
    assert all(v > 0 for v in r["grad_norm"].values()), r["grad_norm"]
    assert len(r["action"]) == 7 and all(abs(a) < 10 for a in r["action"])
    assert r["train_peak_mb"] < 9000, f"one pad step of the 0.5B model took {r['train_peak_mb']:.0f} MB"


@requires_upstream
def test_7b_and_05b_shapes_on_meta_device():
    script = ("import json\nfrom llava_vla_plugin.core.env import apply_env_defaults; apply_env_defaults()\n"
              "from llava_vla_plugin.testing.onevision_configs import meta_parameter_report\n"
              "print('RESULT ' + json.dumps({k: meta_parameter_report(k) for k in ('0.5b', '7b')}))")
    proc = run_py(["-c", script], env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    big, small = r["7b"], r["0.5b"]
    # Qwen2-7B by hand: embed + head (untied) + 28 x (attention with q/k/v biases + MLP + 2 norms) + final norm
    h, inter, kv, vocab = 3584, 18944, 512, 152064
    per_layer = h * h + h + 2 * (kv * h + kv) + h * h + 3 * h * inter + 2 * h
    assert big["llm"] == 2 * vocab * h + 28 * per_layer + h == LLM_PARAMETERS["7b"]
    assert not big["tied"] and small["tied"]
    assert big["shapes"] == {"embed_tokens": [152064, 3584], "lm_head": [152064, 3584], "q_proj": [3584, 3584],
                             "k_proj": [512, 3584], "v_proj": [512, 3584], "o_proj": [3584, 3584],
                             "gate_proj": [18944, 3584], "down_proj": [3584, 18944], "projector.0": [3584, 1152],
                             "projector.2": [3584, 3584], "layers": 28, "tower_layers": 26}
    total_7b = big["llm"] + big["projector"] + big["vision_tower"] + big["image_newline"]
    assert total_7b == 8_030_348_832  # llava-onevision-qwen2-7b-ov: "8.03B"
    assert small["llm"] == LLM_PARAMETERS["0.5b"] and small["shapes"]["k_proj"] == [128, 896]


@requires_upstream
@pytest.mark.slow
def test_gpu_check_tiny_rehearsal(tmp_path):
    # bench/gpu_check.py as the GPU machine runs it, with the tiny model on CPU (the wrapper only
    # installs carried wheels first; its refusal without them is checked below)
    out = tmp_path / "gpu_check.md"
    proc = run_py(["bench/gpu_check.py", "--tiny", "--out", str(out)], env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| pad") or line.startswith("| anyres_max_9")]
    assert len(rows) == 6, table  # 2 modes x (sparse, full) + 2 predict rows
    data = json.loads(out.with_suffix(".json").read_text())
    positions = {r["mode"]: r["positions"] for r in data["train"]}
    assert positions["pad"] - positions["anyres_max_9"] == 730 - 2929
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 for r in data["train"])
    assert set(data["predict_hz"]) == {"pad", "anyres_max_9"}

    import subprocess

    from conftest import ROOT

    wrapper = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny"], cwd=ROOT, capture_output=True, text=True,
                             env=subprocess_env({"CARRY": str(tmp_path / "no-carry")}))
    assert wrapper.returncode == 2 and "prepare_gpu_carry.sh" in wrapper.stderr


@requires_upstream
@pytest.mark.slow
def test_gpu_heads_tiny_rehearsal(tmp_path):
    # bench/gpu_heads.py with the tiny model on CPU: every representation (fast with a codec fitted in the
    # script), both image modes and image sizes, the full-head rows, the split of prefill / decode, the
    # restricted-head id check, and the line the target is read from
    out = tmp_path / "gpu_heads.md"
    # one image size: the second runs the same code with another frame (the suite's time is kept for paths)
    proc = run_py(["bench/gpu_heads.py", "--tiny", "--images", "256x256", "--out", str(out)], env=subprocess_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"parallel_l1/bins_chunk actions/s: \d+\.\dx", last), last
    assert float(last.split(": ")[1][:-1]) > 0
    table = out.read_text()
    assert "| image | image mode | representation | H | call (ms) | prefill (ms) | decode step (ms) | tokens/chunk |" in table
    assert "| decode step restricted (ms) | decode step full (ms) | full / restricted |" in table
    data = json.loads(out.with_suffix(".json").read_text())
    rows = data["rows"]
    reprs = ["bins", "bins_chunk", "parallel_l1", "fast", "bins_chunk (full head)", "fast (full head)"]
    assert {(r["mode"], r["image"]) for r in rows} == {(m, "256x256") for m in ("pad", "anyres_max_9")}
    for key in {(r["mode"], r["image"]) for r in rows}:
        got = {r["repr"]: r for r in rows if (r["mode"], r["image"]) == key}
        assert sorted(got) == sorted(reprs)
        assert got["bins"]["tokens"] == 8 and got["bins_chunk"]["tokens"] == 57 and got["parallel_l1"]["tokens"] == 0
        assert 2 <= got["fast"]["tokens"] <= 57 and got["fast"]["tokens"] == got["fast (full head)"]["tokens"]
        assert got["parallel_l1"]["step_s"] is None and got["parallel_l1"]["shape"] == [8, 7]
        assert all(r["call_s"] >= r["prefill_s"] > 0 and r["actions_per_s"] > 0 for r in got.values())
        assert all(r["step_s"] > 0 for n, r in got.items() if n != "parallel_l1")
        assert all(r["head_restricted"] == r["restrict_head"] for n, r in got.items() if n != "parallel_l1")
    assert len(data["id_checks"]) == 4 and all(c["identical"] for c in data["id_checks"])
    assert 1 < data["fast_codec"]["mean"] < 56  # smooth windows compress
    assert sum(line.startswith("| ") for line in table.splitlines()) == (1 + 12) + (1 + 4)  # headers + rows
