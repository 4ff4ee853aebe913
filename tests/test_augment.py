"""OpenVLA's train-time image augmentation and OFT's centre crop (issue 22 item 3; llava_vla_plugin/core/augment.py).

- the parameter draw is a function of (seed, epoch, sample index, view) only;
- each op, the parameter mapping and the whole chain against TensorFlow, called as dlimp / OpenVLA / OFT call it
  (tests/fixtures/augment_reference.npz, written by tests/fixtures/make_augment_reference.py with TF 2.21);
- the dataset: training images of robot-action samples change, reproducibly, per epoch; validation images and
  the stored files do not; the option off is upstream's path;
- the checkpoint records it and the policy centre-crops; the launcher's IMAGE_AUG reaches the trainer's arguments.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, requires_upstream, subprocess_env
from llava_vla_plugin.core import augment as A

FIXTURE = Path(__file__).parent / "fixtures" / "augment_reference.npz"
# float32 ops: the same formulas in another order of float32 operations (the HSV kernels' divisions, the
# contrast mean's summation order); measured max |diff| 5e-7 on TF 2.21 / numpy 2, so 1e-5 leaves room.
FLOAT_TOL = 1e-5
# uint8 results (the chain, the centre crop): a float difference can move a value across a x*255.5 truncation
# boundary, one level; measured 0 differing pixels.
UINT8_TOL = 1


@pytest.fixture(scope="module")
def ref():
    return np.load(FIXTURE)


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ---- (a) the draw --------------------------------------------------------------------------------------------
def test_draw_is_a_function_of_seed_epoch_index_view():
    p = A.draw_params(42, 3, 17)
    assert A.draw_params(42, 3, 17) == p  # again, in any order, in any process: SeedSequence of the four
    others = [A.draw_params(42, 4, 17), A.draw_params(42, 3, 18), A.draw_params(43, 3, 17), A.draw_params(42, 3, 17, view=1)]
    assert all(o != p for o in others)
    draws = [A.draw_params(0, e, i) for e in range(3) for i in range(200)]
    b = np.array([d.brightness for d in draws])
    assert -0.2 <= b.min() < -0.15 and 0.15 < b.max() < 0.2  # covers OpenVLA's range
    for d in draws:  # OpenVLA's ranges, and dlimp's coupling (module docstring): one u drives all five
        u = (d.brightness + 0.2) / 0.4
        assert 0.8 <= d.contrast < 1.2 and 0.8 <= d.saturation < 1.2 and -0.05 <= d.hue < 0.05
        assert d.contrast == pytest.approx(0.8 + 0.4 * u, abs=1e-6) and d.hue == pytest.approx(-0.05 + 0.1 * u, abs=1e-6)
        y1, x1, y2, x2 = d.crop_box
        assert y1 == x1 and (y2 - y1) * (x2 - x1) == pytest.approx(0.9, abs=1e-6) and y2 <= 1 and x2 <= 1
    free = A.draw_params(0, 0, 0, coupled=False)
    assert free.contrast != pytest.approx(0.8 + 0.4 * (free.brightness + 0.2) / 0.4, abs=1e-4)


# ---- (b) against TensorFlow ----------------------------------------------------------------------------------
def test_each_op_matches_tensorflow(ref):
    x = A.to_float(ref["image"])
    assert _maxdiff(x, ref["image"] / 255.0) < 1e-7
    assert _maxdiff(A.crop_and_resize(x, tuple(ref["crop_box"])), ref["crop"]) < FLOAT_TOL
    for name, op in [("brightness", A.adjust_brightness), ("contrast", A.adjust_contrast),
                     ("saturation", A.adjust_saturation), ("hue", A.adjust_hue)]:
        for i, value in enumerate(ref[name]):
            assert _maxdiff(op(x, float(value)), ref[f"{name}_{i}"]) < FLOAT_TOL, (name, value)


def test_parameters_and_chain_match_dlimp_with_openvla_kwargs(ref):
    """For each TF seed: TF's stateless draws are one u (u == the shape-(1,) draw the crop uses), our mapping of
    that u gives TF's box and op values, and our augmentation of the image is TF's, pixel for pixel."""
    keys = list(ref["draw_keys"])
    for seed, drawn, box, chain in zip(ref["seeds"], ref["draws"], ref["chain_boxes"], ref["chain"]):
        d = dict(zip(keys, drawn.tolist()))
        assert d["u"] == d["u_shape1"], seed  # the premise of the coupling
        p = A.params_from_uniform(d["u"])
        assert _maxdiff(p.crop_box, box) < 1e-6, seed
        for k in ("brightness", "contrast", "saturation", "hue"):
            assert getattr(p, k) == pytest.approx(d[k], abs=1e-6), (seed, k)
        out = np.asarray(A.apply_params(ref["image"], p))
        assert out.dtype == np.uint8 and out.shape == chain.shape
        assert _maxdiff(out, chain) <= UINT8_TOL and (out != chain).mean() < 0.01, seed


def test_centre_crop_matches_oft(ref):
    out = np.asarray(A.center_crop(ref["image"]))
    assert _maxdiff(out, ref["center_crop"]) <= UINT8_TOL and (out != ref["center_crop"]).mean() < 0.01
    assert A.center_crop(np.zeros((5, 7, 3), np.uint8)).size == (7, 5)  # keeps the input's size


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        A.apply_params(np.zeros((4, 4), np.uint8), A.draw_params(0, 0, 0))
    with pytest.raises(ValueError, match="outside the image"):
        A.crop_and_resize(np.zeros((4, 4, 3), np.float32), (0.5, 0.5, 1.2, 1.0))


# ---- (c) the dataset -----------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def frames(tmp_path):
    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    write_vla_dataset(tmp_path, "ds", 4, image_fn=lambda i, r: np.roll(base, 7 * i, axis=1), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    return tmp_path


@pytest.fixture()
def make_dataset(qwen_tokenizer):
    import copy
    from types import SimpleNamespace

    from llava.model.multimodal_encoder.siglip_encoder import SigLipImageProcessor

    from llava_vla_plugin.core.visual_tokens import VisualGeometry
    from llava_vla_plugin.train import register
    register.register()

    def make(root, aspect="pad", is_eval=False, **kw):
        from llava_vla_plugin.train.dataset import VLADataset

        tok = copy.deepcopy(qwen_tokenizer)
        tok.model_max_length = 4096
        tok.vla_visual_geometry = VisualGeometry(aspect, "spatial_unpad")
        args = SimpleNamespace(image_folder=str(root), image_processor=SigLipImageProcessor(), image_aspect_ratio=aspect,
                               is_multimodal=True, early_mix_text=False, mm_use_im_start_end=False,
                               image_grid_pinpoints=[[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)], **kw)
        return VLADataset(str(root / "ds" / "train.jsonl"), tok, args, is_eval=is_eval)

    return make


def _pixels(ds, i):
    return ds[i]["image"][0][0]


@requires_upstream
def test_dataset_augments_training_images_only_and_reproducibly(frames, make_dataset):
    import torch

    files = sorted((frames / "ds" / "images").rglob("*.jpg"))
    before = {f: _sha(f) for f in files}
    off = make_dataset(frames)
    on = make_dataset(frames, vla_image_aug=True, vla_data_seed=3)
    again = make_dataset(frames, vla_image_aug=True, vla_data_seed=3)
    val = make_dataset(frames, vla_image_aug=True, vla_data_seed=3, is_eval=True)
    assert not off.image_aug and on.image_aug and not val.image_aug
    for i in range(len(off)):
        plain = _pixels(off, i)
        aug = _pixels(on, i)
        assert aug.shape == plain.shape and not torch.equal(aug, plain), i  # changed
        assert torch.equal(_pixels(again, i), aug), i  # the same seed and epoch: the same pixels
        assert torch.equal(_pixels(val, i), plain), i  # validation: untouched
        assert on[i]["image"][0][1] == off[i]["image"][0][1]  # the original size (the token budget) is unchanged
        assert torch.equal(on[i]["input_ids"], off[i]["input_ids"]) and torch.equal(on[i]["labels"], off[i]["labels"])
    on.set_augment_epoch(1)
    assert not torch.equal(_pixels(on, 0), _pixels(again, 0))  # another epoch, other parameters
    again.set_augment_epoch(1)
    assert torch.equal(_pixels(on, 0), _pixels(again, 0))
    # the augmented image is upstream's processing of apply_params(the stored frame, the sample's parameters)
    from PIL import Image
    img = A.apply_params(Image.open(files[2]).convert("RGB"), A.draw_params(3, 1, 2))
    assert torch.equal(_pixels(on, 2), on.process_pil(img))
    # workers: two data-loader workers give what the main process gives (the parameters do not depend on them)
    loader = torch.utils.data.DataLoader(on, batch_size=None, num_workers=2, collate_fn=lambda x: x)
    for i, item in enumerate(loader):
        assert torch.equal(item["image"][0][0], _pixels(on, i)), i
    assert {f: _sha(f) for f in files} == before  # the stored files are only read


@requires_upstream
def test_each_camera_view_is_augmented_with_its_own_parameters(tmp_path, make_dataset):
    """CAMERAS=primary,wrist: both views of a training sample change, each with its own draw (view 0 and view 1, as
    OpenVLA augments each camera with its own seed); validation leaves both untouched."""
    import torch
    from PIL import Image

    from llava_vla_plugin.testing.vla_samples import write_vla_dataset

    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    write_vla_dataset(tmp_path, "ds", 2, image_fn=lambda i, r: base, action_fn=lambda i, r: r.uniform(-1, 1, 7),
                      wrist_fn=lambda i, r: base)  # the same picture in both views: only the draws differ
    views = dict(vla_cameras="primary,wrist", vla_image_aug=True, vla_data_seed=5)
    on, val = make_dataset(tmp_path, **views), make_dataset(tmp_path, is_eval=True, **views)
    off = make_dataset(tmp_path, vla_cameras="primary,wrist")
    rows = [json.loads(line) for line in (tmp_path / "ds" / "train.jsonl").read_text().splitlines()]
    for i in range(2):
        primary, wrist = (on[i]["image"][v][0] for v in (0, 1))
        assert not torch.equal(primary, wrist)  # one picture, two parameter draws
        for v, key in ((0, "image"), (1, "image_wrist")):
            img = A.apply_params(Image.open(tmp_path / rows[i][key]).convert("RGB"), A.draw_params(5, 0, i, v))
            assert torch.equal(on[i]["image"][v][0], on.process_pil(img, "pad")), (i, v)
            assert torch.equal(val[i]["image"][v][0], off[i]["image"][v][0]), (i, v)  # validation: untouched


@requires_upstream
@pytest.mark.parametrize("aspect", ["pad", "anyres_max_9"])
def test_process_pil_is_upstreams_process_image(frames, make_dataset, aspect):
    """process_pil re-states upstream's process_image after its Image.open (there is no hook between the two)."""
    import torch
    from PIL import Image

    ds = make_dataset(frames, aspect)
    rel = ds.list_data_dict[1]["image"]
    with Image.open(frames / rel) as im:
        mine = ds.process_pil(im.convert("RGB"))
    assert torch.equal(mine, ds.process_image(rel)[0])


# ---- the checkpoint and the policy ---------------------------------------------------------------------------
def _checkpoint(path: Path, image_aug) -> Path:
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    path.mkdir()
    ActionTokenizer(first_token_id=151646).save(path)
    stats = {"ds": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}}}
    (path / "dataset_statistics.json").write_text(json.dumps(stats))
    (path / "config.json").write_text("{}")
    if image_aug is not None:
        (path / "vla_run_config.json").write_text(json.dumps({"vla_image_aug": image_aug, "seed": 42}))
    return path


def test_checkpoint_records_image_aug(tmp_path):
    from llava_vla_plugin.core import checkpoint, run_config

    assert "vla_image_aug" in run_config.RUN_KEYS  # written with the run's settings; a resume must match it
    assert checkpoint.read(_checkpoint(tmp_path / "aug", True)).image_aug is True
    assert checkpoint.read(_checkpoint(tmp_path / "plain", False)).image_aug is False
    assert checkpoint.read(_checkpoint(tmp_path / "old", None)).image_aug is False  # before the option existed
    merged = tmp_path / "merged"
    merged.mkdir()
    checkpoint.copy_policy_files(tmp_path / "aug", merged)  # a LoRA merge or an export carries it
    assert run_config.image_aug_of(merged) is True
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vla_run_config.json").write_text(json.dumps({"vla_image_aug": "yes"}))
    with pytest.raises(ValueError, match="vla_image_aug is 'yes', expected true or false"):
        run_config.image_aug_of(tmp_path / "bad")


class _Backend:
    def encode(self, pils, prompt_ids, texts, pad_id):
        return pils


class _Prompt:
    def prompt_ids(self, text):
        return [1]

    def prompt_text(self, text):
        return text


@pytest.mark.parametrize("trained_with_aug", [True, False])
def test_policy_centre_crops_only_for_a_checkpoint_trained_with_the_crop(trained_with_aug):
    """VLAPolicy.prepare (the input transforms) hands the backend OFT's centre crop for an augmented checkpoint
    and the image itself otherwise (no model: the backend here returns what it is given)."""
    from llava_vla_plugin.infer.pipeline import VLAPolicy

    policy = VLAPolicy.__new__(VLAPolicy)
    policy.backend, policy.prompt_builder, policy.pad_id = _Backend(), _Prompt(), 0
    policy._prompt_lock, policy.center_crop = threading.Lock(), trained_with_aug
    from llava_vla_plugin.core.inputs import InputConfig

    policy.inputs = InputConfig()  # the primary view alone (vla_inputs.json absent)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    (got,) = policy.prepare([image], "pick")
    want = A.center_crop(image) if trained_with_aug else image
    assert np.array_equal(np.asarray(got), np.asarray(want))


# ---- (d) the launcher ----------------------------------------------------------------------------------------
def _launch(cwd: Path, *extra: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = subprocess_env({"NUM_GPUS": "0", "MODEL": "lmms-lab/never-loaded", "DATA": "data/train.jsonl",
                          "IMAGE_FOLDER": "data", "OUTPUT_DIR": "runs/x", **env_vars})
    env.pop("PYTHONPATH")
    return subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), *extra], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_launcher_image_aug_reaches_the_trainer_arguments(tmp_path):
    """IMAGE_AUG=1 becomes --vla_image_aug True in the trainer's arguments: preflight (which reads the final
    argument list) refuses it beside persistent workers, naming both; IMAGE_AUG=yes is refused by the launcher."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("{}\n")
    proc = _launch(tmp_path, IMAGE_AUG="yes")
    assert proc.returncode == 2 and "IMAGE_AUG=yes: expected 0 (no augmentation) or 1" in proc.stderr
    proc = _launch(tmp_path, "--dataloader_persistent_workers", "True", IMAGE_AUG="1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "IMAGE_AUG (--vla_image_aug) True with --dataloader_persistent_workers True" in proc.stderr
    assert not (tmp_path / "runs").exists()
    from llava_vla_plugin.train.preflight import problems

    assert problems(["--vla_image_aug", "maybe"]) and "IMAGE_AUG (--vla_image_aug) 'maybe'" in problems(["--vla_image_aug", "maybe"])[-1]


@requires_upstream
def test_epoch_callback_gives_the_dataset_the_trainers_epoch():
    """on_epoch_begin (before the epoch's workers start) sets the epoch: e at the start of epoch e, floor on a
    resume inside an epoch (state.epoch is fractional there)."""
    from types import SimpleNamespace

    from llava_vla_plugin.train.trainer import AugmentEpochCallback

    seen = []
    cb = AugmentEpochCallback(SimpleNamespace(set_augment_epoch=seen.append))
    for epoch in (None, 0.0, 1.0, 1.5, 2.9999999):
        cb.on_epoch_begin(None, SimpleNamespace(epoch=epoch), None)
    assert seen == [0, 0, 1, 1, 3]


@requires_upstream
@pytest.mark.slow
def test_launcher_trains_with_image_aug_and_the_policy_crops(tiny_model, tmp_path):
    """The user path: IMAGE_AUG=1 through the launcher (its default NUM_WORKERS=4, so the augmentation runs in
    data-loader workers), 2 steps; the checkpoint records it and VLAPolicy centre-crops its inputs. Overridden
    defaults, each to keep the test short on CPU: MAX_STEPS, BATCH_SIZE, NUM_GPUS=0, pad, MODEL_MAX_LENGTH."""
    from llava_vla_plugin.core import checkpoint
    from llava_vla_plugin.testing.vla_samples import colour_image, write_mixture, write_vla_dataset

    data = tmp_path / "data"
    write_vla_dataset(data, "ds", 4, image_fn=lambda i, r: colour_image(r, i % 3), action_fn=lambda i, r: r.uniform(-1, 1, 7))
    mixture = write_mixture(data, [("ds", 1.0)])
    out = tmp_path / "run-qwen"
    env = subprocess_env(tiny_model.env())
    env.update(MODEL=str(tiny_model.llava_dir), VISION_TOWER=tiny_model.vision_tower, DATA=str(mixture), IMAGE_FOLDER=str(data),
               OUTPUT_DIR=str(out), NUM_GPUS="0", BATCH_SIZE="2", MAX_STEPS="2", SAVE_STEPS="1000", IMAGE_ASPECT_RATIO="pad",
               MODEL_MAX_LENGTH="1024", IMAGE_AUG="1")
    proc = subprocess.run(["bash", str(ROOT / "scripts/finetune_ov_vla.sh"), "--gradient_checkpointing", "False"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "--vla_image_aug: robot-action training images get OpenVLA's augmentation" in proc.stderr
    assert json.loads((out / "vla_run_config.json").read_text())["vla_image_aug"] is True
    assert checkpoint.read(out).image_aug is True
    script = ("import sys; from llava_vla_plugin.infer.pipeline import VLAPolicy; "
              "p = VLAPolicy.from_pretrained(sys.argv[1], device='cpu'); print('CROP', p.center_crop)")
    check = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "CROP True" in check.stdout, check.stderr[-3000:]
