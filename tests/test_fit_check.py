"""A configuration that cannot fit one frame fails before any weight is loaded (llava_vla_plugin/train/fit_check.py),
and visual_tokens.py's formula gives the documented per-frame counts."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_upstream, subprocess_env
from llava_vla_plugin.train.fit_check import FrameProbe, fit_problem, first_frames
from llava_vla_plugin.core.visual_tokens import DOCUMENTED_VISUAL_TOKENS, PAD_VISUAL_TOKENS, VisualGeometry


def test_formula_gives_the_documented_counts():
    """DOCUMENTED_VISUAL_TOKENS is literal data (docs/DESIGN.md section 3); the formula must reproduce it."""
    assert set(DOCUMENTED_VISUAL_TOKENS) >= {("pad", None), ("anyres_max_9", (256, 320)), ("anyres_max_9", (480, 640)),
                                             ("anyres_max_9", (256, 256))}
    for (mode, hw), want in DOCUMENTED_VISUAL_TOKENS.items():
        g = VisualGeometry(mode, "spatial_unpad")
        h, w = hw or (480, 640)
        assert g.tokens(w, h) == want, (mode, hw)
    assert sorted(DOCUMENTED_VISUAL_TOKENS.values()) == [730, 1317, 1485, 2929]
    assert PAD_VISUAL_TOKENS == 730


def _dataset(folder: Path, name: str, size_hw: tuple[int, int], n: int = 2) -> Path:
    from llava_vla_plugin.testing.vla_samples import colour_image, write_vla_dataset

    write_vla_dataset(folder, name, n, image_fn=lambda i, r: colour_image(r, i % 3, size=size_hw),
                      action_fn=lambda i, r: [0.0] * 7)
    return folder / name / "train.jsonl"


def test_fit_problem_names_the_largest_frame_and_the_numbers(tmp_path):
    small = _dataset(tmp_path, "small", (256, 320))
    large = _dataset(tmp_path, "large", (480, 640))
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"datasets:\n  - json_path: {small}\n  - json_path: {large}\n")
    frames = first_frames(str(mix), str(tmp_path))
    assert [(Path(f.data_file).parent.name, f.size) for f in frames] == [("small", (320, 256)), ("large", (640, 480))]
    g = VisualGeometry("anyres_max_9", "spatial_unpad")
    msg = fit_problem(g, 2048, frames, 48)
    assert msg is not None
    assert "640x480" in msg and "2929 visual tokens" in msg and "2977" in msg and "large" in msg and "730" in msg
    assert fit_problem(g, 2977, frames, 48) is None  # exactly enough
    assert fit_problem(VisualGeometry("pad", "spatial_unpad"), 800, frames, 48) is None
    assert "778" in fit_problem(VisualGeometry("pad", "spatial_unpad"), 700, [FrameProbe("f", "i", (4, 4))], 48)


@requires_upstream
def test_launcher_fails_before_loading_weights(tiny_model, tmp_path):
    """Through scripts/finetune_ov_vla.sh with its default image_aspect_ratio (anyres_max_9) and 480x640 frames:
    2929 visual tokens cannot fit MODEL_MAX_LENGTH=2048, so the run stops in seconds, before upstream's
    train() builds the model. (Runs that fit pass the check and train: tests/test_train_e2e.py.)"""
    data = _dataset(tmp_path, "bridge_like", (480, 640))
    env = subprocess_env({
        **tiny_model.env(), "MODEL": str(tiny_model.llava_dir), "VISION_TOWER": tiny_model.vision_tower,
        "DATA": str(data), "IMAGE_FOLDER": str(tmp_path), "OUTPUT_DIR": str(tmp_path / "run"),
        # CPU: one process (the default 8-GPU torchrun cannot start here); a short length that cannot fit
        "NUM_GPUS": "0", "NUM_WORKERS": "0", "MODEL_MAX_LENGTH": "2048", "VLA_PYTHON": str(Path(os.sys.executable)),
    })
    start = time.monotonic()
    p = subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh")], env=env, capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    elapsed = time.monotonic() - start
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-4000:]
    assert "--model_max_length 2048 cannot fit one frame: 640x480" in p.stderr
    assert "2929 visual tokens" in p.stderr and "image_aspect_ratio=anyres_max_9" in p.stderr
    assert "384px tiles of 14px patches" in p.stderr and f"{tiny_model.vision_tower}'s config" in p.stderr  # offline
    # no model was built: upstream prints the prompt version after loading the model and tokenizer,
    # and our initialize_vision_tokenizer hook (after the tower is loaded) never ran
    assert "Prompt version" not in out and "VLADataset" not in out
    assert not any((tmp_path / "run").glob("*.safetensors"))
    # the aborted launch removed what it wrote: the pending settings and the OUTPUT_DIR it created (issue 26)
    assert not (tmp_path / "run").exists() and f"the empty {tmp_path / 'run'} this launch had created" in p.stderr
    print(f"failed in {elapsed:.1f}s")
    assert elapsed < 120, f"the fit check took {elapsed:.0f}s: it should come before any loading"
