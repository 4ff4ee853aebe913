"""Export to transformers' LlavaOnevisionForConditionalGeneration: same logits and actions as upstream.

A VLA checkpoint of the tiny model (action tokens added, their rows perturbed so argmax is not a tie,
anyres_max_9, statistics) is exported with the CLI users run; a 480x640 frame (non-square: the
unpadding runs) and a prompt go through upstream's model and through transformers' own processor and
model in fp32: pixel values equal, logits within 1e-4, same argmax at every action position, and the
policies (VLAPolicy on upstream, HFVLAPolicy on transformers) give the same actions, for anyres_max_9
and, through HFVLAPolicy's pad path, for `pad`. Everything runs in subprocesses (the tiny tower
resolves only with HF_HOME set before transformers is imported).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from policy_files_check import assert_same_policy
from conftest import ROOT, requires_upstream, run_py, subprocess_env

MAKE_CKPT = r'''
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.train.register import add_action_tokens
from llava_vla_plugin.testing.onevision_configs import ANYRES_MAX_9_PINPOINTS, example_statistics
from llava_vla_plugin.train.trainer import write_vla_files

src, out, head_out = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)
model = LlavaQwenForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src)
at = ActionTokenizer()
try:  # branches where the hooks still hand the action tokenizer over in state.py
    from llava_vla_plugin import state
    state.set_action_tokenizer(at)
except ImportError:
    pass
add_action_tokens(model, tok)
at.add_to_tokenizer(tok)  # binds the ids (idempotent)
with torch.no_grad():  # trained rows differ; mean-initialised ones would make every action logit tie
    w = model.get_input_embeddings().weight
    w[at.token_ids[0]:at.token_ids[-1] + 1] += 0.5 * torch.randn(at.n_bins, w.shape[1])
model.config.image_aspect_ratio = "anyres_max_9"
model.config.image_grid_pinpoints = ANYRES_MAX_9_PINPOINTS
model.save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
write_vla_files(out, at, example_statistics())
# the same checkpoint with a regression head beside the LM, as action-chunk checkpoints will carry
shutil.copytree(out, head_out)
path = os.path.join(head_out, "model.safetensors")
sd = load_file(path)
sd["action_head.proj.weight"] = torch.randn(7 * 8, model.config.hidden_size)
save_file(sd, path, metadata={"format": "pt"})
print("OK")
'''

COMPARE = r'''
import json, sys
import numpy as np, torch
from PIL import Image
from llava.mm_utils import process_images
from llava.model.builder import load_pretrained_model
from llava_vla_plugin.infer.hf_policy import HFVLAPolicy
from llava_vla_plugin.infer.policy import VLAPolicy
from llava_vla_plugin.core.prompt import IMAGE_TOKEN_INDEX

ckpt, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
rng = np.random.default_rng(0)
arr = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
arr[:, :320, 0] = 255  # structure, so crops differ
pil = Image.fromarray(arr)
instruction = "put the red cup in the sink"
res = {}

up = VLAPolicy.from_pretrained(ckpt, device="cpu", dtype="float32", last_logits_only=False)
hf = HFVLAPolicy.from_pretrained(out, device="cpu", dtype="float32")
res["mode"] = hf.image_aspect_ratio
model = up.model

# pixel values: upstream's process_images vs transformers' processor
px_up = process_images([pil], up.backend.image_processor, model.config)[0]
inputs = hf.model_inputs(pil, instruction)
px_hf = inputs["pixel_values"][0]
res["crops"] = [int(px_up.shape[0]), int(px_hf.shape[0])]
res["pixel_max_diff"] = float((px_up - px_hf).abs().max())

# the same ids once the expanded <image> run is collapsed to upstream's placeholder
ids_up = up.prompt_builder.prompt_ids(instruction)
image_id = hf.model.config.image_token_id
ids_hf = inputs["input_ids"][0].tolist()
n_image = ids_hf.count(image_id)
collapsed = [t for i, t in enumerate(ids_hf) if t != image_id or ids_hf[i - 1] != image_id]
res["ids_equal"] = [IMAGE_TOKEN_INDEX if t == image_id else t for t in collapsed] == ids_up
res["image_tokens_hf"] = n_image

# a full training sample: prompt + 7 action tokens + <|im_end|>; compare the last K positions' logits
actions = up.action_tokenizer.encode_to_ids(rng.uniform(-1, 1, 7)).tolist()
tail = [*actions, up.end_id]
K = len(tail) + 24
with torch.no_grad():
    ids = torch.tensor([ids_up + tail])
    _, pos, am, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids), None, None,
                                                                          [px_up], ["image"], [pil.size])
    res["image_tokens_upstream"] = embeds.shape[1] - (ids.shape[1] - 1)
    o_up = super(type(model), model).forward(inputs_embeds=embeds, attention_mask=am, position_ids=pos,
                                             logits_to_keep=K, output_hidden_states=True)
    hf_ids = torch.cat([inputs["input_ids"], torch.tensor([tail])], dim=1)
    o_hf = hf.model(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids), pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"], logits_to_keep=K, output_hidden_states=True)
# upstream's load_pretrained_model cuts the vocabulary to len(tokenizer) (151,902 with the action tokens);
# the checkpoint and the export keep Qwen2's 151,936 rows: compare the ids both have
V = o_up.logits.shape[-1]
res["vocab"] = [V, int(o_hf.logits.shape[-1])]
o_hf.logits = o_hf.logits[..., :V]
res["positions"] = [int(embeds.shape[1]), int(hf_ids.shape[1])]
res["hidden_max_diff"] = float((o_up.hidden_states[-1] - o_hf.hidden_states[-1]).abs().max())
res["logits_max_diff"] = float((o_up.logits - o_hf.logits).abs().max())
res["logits_scale"] = float(o_up.logits.abs().max())
act = slice(K - len(tail) - 1, K - 1)  # positions whose next token is an action token or <|im_end|>
res["argmax_up"] = o_up.logits[0, act].argmax(-1).tolist()
res["argmax_hf"] = o_hf.logits[0, act].argmax(-1).tolist()
res["argmax_distinct"] = len(set(res["argmax_up"]))

res["action_ids_up"] = up.predict_action_ids([pil], [instruction])[0].tolist()
res["action_ids_hf"] = hf.predict_action_ids([pil], [instruction])[0].tolist()
res["actions_up"] = up.predict_action(pil, instruction, unnorm_key="bridge_orig").tolist()
res["actions_hf"] = hf.predict_action(pil, instruction, unnorm_key="bridge_orig").tolist()
print("RESULT " + json.dumps(res))
'''

PAD_COMPARE = r'''
import json, sys
import numpy as np, torch
from PIL import Image
from llava_vla_plugin.infer.hf_policy import HFVLAPolicy
from llava_vla_plugin.infer.policy import VLAPolicy
ckpt, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(1)
res = {}
up = VLAPolicy.from_pretrained(ckpt, device="cpu", dtype="float32")
hf = HFVLAPolicy.from_pretrained(out, device="cpu", dtype="float32")
res["mode"] = hf.image_aspect_ratio
for h, w in ((480, 640), (256, 320)):
    pil = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    from llava.mm_utils import process_images
    res[f"pixel_max_diff {h}x{w}"] = float((process_images([pil], up.backend.image_processor, up.model.config)[0]
                                             - hf.pad_pixel_values(pil)).abs().max())
    res[f"tokens {h}x{w}"] = int((hf.model_inputs(pil, "x")["input_ids_for_check"] == hf.model.config.image_token_id).sum())
    res[f"up {h}x{w}"] = up.predict_action_ids([pil], ["open the drawer"])[0].tolist()
    res[f"hf {h}x{w}"] = hf.predict_action_ids([pil], ["open the drawer"])[0].tolist()
print("RESULT " + json.dumps(res))
'''


def assert_matches_upstream(r: dict) -> None:
    """COMPARE's result for one 480x640 frame under anyres_max_9 (the tiny model's and the real 0.5B's tests)."""
    assert r["mode"] == "anyres_max_9"
    assert r["crops"] == [5, 5] and r["pixel_max_diff"] == 0.0, r
    assert r["ids_equal"], r
    assert r["image_tokens_hf"] == r["image_tokens_upstream"] == 2929
    assert r["positions"][0] == r["positions"][1]
    assert r["logits_max_diff"] < 1e-4, r
    assert r["hidden_max_diff"] < 1e-4, r
    assert r["argmax_up"] == r["argmax_hf"] and r["argmax_distinct"] > 1, r
    assert r["action_ids_up"] == r["action_ids_hf"], r
    assert r["actions_up"] == r["actions_hf"]


def _result(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_hf")
    env = subprocess_env(tiny_model.env())
    ckpt, head_ckpt = root / "vla-qwen", root / "vla-head-qwen"
    proc = run_py(["-c", MAKE_CKPT, str(tiny_model.llava_dir), str(ckpt), str(head_ckpt)], env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = root / "hf"
    # the command users run, from a directory outside the repo
    proc = run_py(["-m", "llava_vla_plugin.infer.export_hf", str(ckpt), str(out)], env=env, timeout=1200, cwd=root)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "wrote" in proc.stdout
    return {"root": root, "ckpt": ckpt, "head_ckpt": head_ckpt, "out": out, "env": env}


@requires_upstream
def test_export_matches_upstream_anyres(exported):
    out = exported["out"]
    for name in ("config.json", "model.safetensors", "processor_config.json", "vla_action_tokenizer.json",
                 "dataset_statistics.json", "vla_export.json", "tokenizer.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert cfg["vision_aspect_ratio"] == "anyres_max_9" and cfg["vision_feature_layer"] == -1
    assert (out / "vla_action_tokenizer.json").read_text() == (exported["ckpt"] / "vla_action_tokenizer.json").read_text()
    assert_same_policy(exported["ckpt"], out)  # the export reads as its checkpoint does (one owner)

    r = _result(run_py(["-c", COMPARE, str(exported["ckpt"]), str(out)], env=exported["env"], timeout=1800))
    print({k: v for k, v in r.items() if "max_diff" in k or k in ("positions", "vocab", "argmax_up", "argmax_hf")})
    assert_matches_upstream(r)


@requires_upstream
def test_export_pad_checkpoint_gives_same_actions(exported, tmp_path):
    # the same weights trained with `pad`: transformers' processor cannot do it; HFVLAPolicy's pad path can
    ckpt = tmp_path / "pad-qwen"
    ckpt.mkdir()
    for f in exported["ckpt"].iterdir():
        if f.name != "config.json":
            (ckpt / f.name).symlink_to(f)
    cfg = json.loads((exported["ckpt"] / "config.json").read_text())
    cfg["image_aspect_ratio"] = "pad"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "hf-pad"
    proc = run_py(["-m", "llava_vla_plugin.infer.export_hf", str(ckpt), str(out)], env=exported["env"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained with image_aspect_ratio='pad'" in proc.stdout
    r = _result(run_py(["-c", PAD_COMPARE, str(ckpt), str(out)], env=exported["env"], timeout=1800))
    assert r["mode"] == "pad"
    for size in ("480x640", "256x320"):
        assert r[f"tokens {size}"] == 730
        assert r[f"pixel_max_diff {size}"] < 1e-6, r
        assert r[f"up {size}"] == r[f"hf {size}"], r


@requires_upstream
def test_export_regression_head_travels_separately(exported, tmp_path):
    out = tmp_path / "hf-head"
    proc = run_py(["-m", "llava_vla_plugin.infer.export_hf", str(exported["head_ckpt"]), str(out)], env=exported["env"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vla_extra_heads.safetensors" in proc.stdout
    info = json.loads((out / "vla_export.json").read_text())
    assert info["extra_heads"]["parameters"] == ["action_head.proj.weight"]
    from safetensors.torch import load_file

    assert list(load_file(str(out / "vla_extra_heads.safetensors"))) == ["action_head.proj.weight"]
    # refuses to write into a non-empty folder
    again = run_py(["-m", "llava_vla_plugin.infer.export_hf", str(exported["head_ckpt"]), str(out)], env=exported["env"])
    assert again.returncode == 2 and "not empty" in again.stderr


CHUNK_COMPARE = r'''
import json, sys
import numpy as np
from PIL import Image
from llava_vla_plugin import VLAPolicy
ckpt, out = sys.argv[1], sys.argv[2]
pil = Image.fromarray(np.random.default_rng(2).integers(0, 256, (480, 640, 3), dtype=np.uint8))
up = VLAPolicy.from_pretrained(ckpt, device="cpu", dtype="float32")
hf = VLAPolicy.from_pretrained(out, device="cpu", dtype="float32")  # no backend named: the export says which
res = {"backends": [type(up.backend).__name__, type(hf.backend).__name__], "repr": [hf.action_repr.name, hf.horizon]}
for name, p in (("up", up), ("hf", hf)):
    res[name] = p.predict_actions([pil, pil], "open the drawer", unnorm_key="bridge_orig").tolist()
print("RESULT " + json.dumps(res))
'''


def _relabelled(src: Path, dst: Path, horizon: int) -> Path:
    """`src` (symlinked) as a bins_chunk H=`horizon` checkpoint: what is decoded is the subject, not the training."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "vla_action_repr.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "vla_action_repr.json").read_text()) if (src / "vla_action_repr.json").exists() else {}
    (dst / "vla_action_repr.json").write_text(json.dumps({**cfg, "name": "bins_chunk", "horizon": horizon}))
    return dst


@requires_upstream
def test_one_pipeline_serves_an_export_and_decodes_chunks_there(exported, tmp_path):
    """VLAPolicy.from_pretrained on an export takes the transformers backend by itself (so /act, the vla-eval
    server and offline eval serve exports), and that backend now decodes bins_chunk: the same [B, H, D]
    actions as the upstream backend on the checkpoint it was exported from."""
    ckpt = _relabelled(exported["ckpt"], tmp_path / "ckpt-chunk", 2)
    out = _relabelled(exported["out"], tmp_path / "hf-chunk", 2)
    assert_same_policy(ckpt, out)
    r = _result(run_py(["-c", CHUNK_COMPARE, str(ckpt), str(out)], env=exported["env"], timeout=1800))
    assert r["backends"] == ["UpstreamBackend", "TransformersBackend"] and r["repr"] == ["bins_chunk", 2], r
    assert np.array(r["hf"]).shape == (2, 2, 7), r
    np.testing.assert_allclose(r["hf"], r["up"], rtol=0, atol=1e-9)


def test_transformers_backend_refuses_a_head_before_loading(exported, tmp_path):
    """A parallel_l1 export: the head is not part of the transformers model, so the pipeline says so and what
    to load instead, before any weight is read."""
    from llava_vla_plugin.infer.hf_policy import HFVLAPolicy

    out = tmp_path / "hf-l1"
    out.mkdir()
    for f in exported["out"].iterdir():
        if f.name not in ("vla_action_repr.json", "model.safetensors"):  # no weights: a load would fail differently
            (out / f.name).symlink_to(f)
    (out / "vla_action_repr.json").write_text(json.dumps({"name": "parallel_l1", "horizon": 2, "action_dim": 7}))
    with pytest.raises(ValueError, match="parallel_l1.*Load the training checkpoint"):
        HFVLAPolicy.from_pretrained(out, device="cpu")


def test_export_refuses_a_fast_checkpoint_before_loading(exported, tmp_path):
    """fast's <FAST_i> rows and <image>/<video> would both need rows past the embedding; the export does not
    resize yet, so it says so (and what to serve with) before any weight is read."""
    from llava_vla_plugin.infer.export_hf import ExportError, export

    src = tmp_path / "fast-ckpt"
    src.mkdir()
    for f in exported["out"].iterdir():
        if f.name not in ("vla_action_repr.json", "model.safetensors"):
            (src / f.name).symlink_to(f)
    (src / "vla_action_repr.json").write_text(json.dumps({"name": "fast", "horizon": 4, "action_dim": 7,
                                                           "options": {"tokenizer": "gone"}}))
    with pytest.raises(ExportError, match="`fast` checkpoint.*upstream backend"):
        export(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
