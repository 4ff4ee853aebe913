"""Training data under faults (issue 11 "Training data"): the visual-token arithmetic against the real model,
over-long samples, runs of bad samples, malformed robot-action samples."""

from __future__ import annotations

import json

import pytest

from conftest import requires_upstream, run_py, subprocess_env
from llava_vla_plugin.core.visual_tokens import VisualGeometry, sample_budget

# (image_aspect_ratio, mm_patch_merge_type, (width, height))
CASES = [
    ("pad", "spatial_unpad", (320, 256)),
    ("anyres_max_9", "spatial_unpad", (320, 256)),
    ("anyres_max_9", "spatial_unpad", (640, 480)),
    ("anyres_max_9", "spatial_unpad", (256, 256)),
    ("anyres_max_9", "spatial_unpad", (300, 1000)),
    ("anyres_max_9", "spatial_unpad", (1920, 1080)),  # shrunk: times > 1.1
    ("anyres", "spatial", (640, 480)),
    ("anyres", "flat", (320, 256)),
    ("pad", "flat", (640, 480)),
]


def test_onevision_reference_counts():
    assert VisualGeometry("pad").tokens(320, 256) == 730
    g = VisualGeometry("anyres_max_9", "spatial_unpad")
    assert (g.tokens(320, 256), g.tokens(640, 480), g.tokens(256, 256)) == (1317, 2929, 1485)
    b = sample_budget(60, [(640, 480)], g)
    assert (b.text_tokens, b.visual_tokens, b.total) == (59, 2929, 2988)


SCRIPT = r"""
import json, sys
import torch
from PIL import Image
from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
from llava.mm_utils import process_images
from llava.constants import IMAGE_TOKEN_INDEX
from llava_vla_plugin.core.visual_tokens import VisualGeometry
model = LlavaQwenForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
model.config.tokenizer_model_max_length = 10 ** 6
proc = model.get_vision_tower().image_processor
out = []
for mode, merge, (w, h) in json.loads(sys.argv[2]):
    model.config.image_aspect_ratio, model.config.mm_patch_merge_type = mode, merge
    # upstream train.py turns "(1x1),...,(6x6)" into pixel pinpoints before the model sees them
    model.config.image_grid_pinpoints = [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]
    img = Image.new("RGB", (w, h), (90, 120, 30))
    images = process_images([img], proc, model.config)
    images = list(images)  # as upstream's collator passes them in training: one tensor per image
    ids = torch.tensor([[11, IMAGE_TOKEN_INDEX, 12]])
    with torch.no_grad():
        r = model.prepare_inputs_labels_for_multimodal(ids, None, torch.ones_like(ids, dtype=torch.bool), None, None,
                                                       images, ["image"], image_sizes=[img.size])
    out.append([r[4].shape[1] - 2, VisualGeometry.from_model(model).tokens(w, h)])
print("RESULT" + json.dumps(out))
"""


@requires_upstream
def test_visual_tokens_match_the_real_model(tiny_model):
    proc = run_py(["-c", SCRIPT, str(tiny_model.llava_dir), json.dumps(CASES)], env=subprocess_env(tiny_model.env()))
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    for case, (real, computed) in zip(CASES, got):
        assert computed == real, (case, real, computed)


# ----------------------------------------------------------------------------------------------
# VLADataset (real tokenizer, real SigLIP processor, real JPEGs)


@pytest.fixture()
def frames(tmp_path):
    import numpy as np

    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    # 480x640 frames, as DROID/Bridge-style cameras record them
    write_vla_dataset(tmp_path, "ds", 6, image_fn=lambda i, r: r.integers(0, 255, (480, 640, 3), dtype=np.uint8),
                      action_fn=lambda i, r: r.uniform(-1, 1, 7))
    return tmp_path


@pytest.fixture()
def make_dataset(qwen_tokenizer):
    import copy
    from types import SimpleNamespace

    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    from llava_vla_plugin.train import register
    register.register()

    def make(root, aspect="pad", max_len=4096, **kw):
        from llava_vla_plugin.train.dataset import VLADataset

        tok = copy.deepcopy(qwen_tokenizer)
        tok.model_max_length = max_len
        # what register.py's initialize_vision_tokenizer hook sets from the model (OneVision: spatial_unpad)
        tok.vla_visual_geometry = VisualGeometry(aspect, "spatial_unpad")
        args = SimpleNamespace(image_folder=str(root), image_processor=SigLipImageProcessor(), image_aspect_ratio=aspect,
                               is_multimodal=True, early_mix_text=False, mm_use_im_start_end=False,
                               image_grid_pinpoints=[[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)], **kw)
        return VLADataset(str(root / "ds" / "train.jsonl"), tok, args)

    return make


@requires_upstream
def test_over_long_sample_fails_before_training_with_the_numbers(frames, make_dataset):
    from llava_vla_plugin.train.dataset import BadSampleError

    # anyres_max_9 at 480x640 is 2929 visual tokens: a 2048 max length cuts every sample's action labels
    with pytest.raises(BadSampleError, match=r"sample 'ds/train/000000/0000'.*needs \d+ positions = \d+ text \+ 2929 "
                                             r"visual tokens \(640x480.*anyres_max_9.*--model_max_length is 2048"):
        make_dataset(frames, "anyres_max_9", 2048)
    ds = make_dataset(frames, "anyres_max_9", 3100)  # fits: trains
    assert (ds[0]["labels"] != -100).sum() == 8
    ds = make_dataset(frames, "pad", 1024)  # pad: 730 visual tokens fit
    assert (ds[0]["labels"] != -100).sum() == 8


@requires_upstream
def test_skip_counts_over_long_samples_then_stops_on_a_run_of_them(frames, make_dataset):
    from llava_vla_plugin.train.dataset import BadSampleError

    ds = make_dataset(frames, "anyres_max_9", 2048, vla_skip_bad_samples=True)
    with pytest.raises(BadSampleError, match=r"6 samples in a row .* are bad.*--model_max_length"):
        ds[0]
    assert ds.skipped == 6


@requires_upstream
def test_wrong_image_folder_stops_with_a_clear_error_not_recursion(tmp_path, make_dataset, monkeypatch):
    import numpy as np

    from llava_vla_plugin.train import dataset as dataset_mod
    from llava_vla_plugin.train.dataset import BadSampleError
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    monkeypatch.setattr(dataset_mod, "MAX_CONSECUTIVE_BAD", 40)  # the default 50, made smaller for speed
    write_vla_dataset(tmp_path, "ds", 1200, image_fn=lambda i, r: np.zeros((8, 8, 3), np.uint8),
                      action_fn=lambda i, r: r.uniform(-1, 1, 7))
    for p in (tmp_path / "ds" / "images").rglob("*.jpg"):
        p.unlink()  # as with a wrong --image_folder
    ds = make_dataset(tmp_path, "pad", 4096, vla_skip_bad_samples=True)
    with pytest.raises(BadSampleError, match=r"40 samples in a row .*does not exist.*check --image_folder"):
        ds[5]
    assert ds.skipped == 40


@pytest.mark.parametrize("bad,match", [
    (lambda s: s["conversations"][1].__setitem__("value", json.dumps(s["conversations"][1]["value"])),
     "the action is a string"),
    (lambda s: s["conversations"][1]["value"].__setitem__(6, True), "non-numeric, boolean"),
    (lambda s: s["conversations"][0].__setitem__("value", "<image>\n<image>\n" + s["conversations"][0]["value"]
                                                  .replace("<image>\n", "")), "2 <image> tokens"),
], ids=["string-action", "boolean", "two-images"])
@requires_upstream
def test_malformed_robot_action_samples_rejected(frames, make_dataset, bad, match):
    from llava_vla_plugin.train.dataset import BadSampleError

    path = frames / "ds" / "train.jsonl"
    lines = path.read_text().splitlines()
    sample = json.loads(lines[3])
    bad(sample)
    lines[3] = json.dumps(sample)
    path.write_text("\n".join(lines) + "\n")
    ds = make_dataset(frames, "pad", 4096)
    with pytest.raises(BadSampleError, match=rf"ds/train/000003/0000.*{match}"):
        ds[3]
