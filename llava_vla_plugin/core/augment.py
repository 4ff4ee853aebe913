"""OpenVLA's train-time image augmentation and OpenVLA-OFT's inference-time centre crop, in numpy (issue 22 item 3).

Why this exists: OpenVLA and OFT fine-tune with `image_aug=True` (OFT: "HIGHLY RECOMMENDED",
openvla-oft vla-scripts/finetune.py:102) and evaluate a model trained with the random crop on a centre crop
of the same area (openvla-oft experiments/robot/libero/run_libero_eval.py:138). Our images are read from
converted JPEGs by upstream LLaVA's `process_image`, not by a tf.data pipeline, so the ops are re-implemented
here on numpy, op for op, and tests/test_augment.py compares them with TensorFlow's (the reference,
tests/fixtures/make_augment_reference.py).

The reference, read at openvla/openvla c8f03f48 and kvablack/dlimp ad72ce3a:
  * parameters: openvla prismatic/vla/datasets/datasets.py:122-136 (the same in openvla-oft 213c5ff8
    prismatic/vla/datasets/datasets.py:151-165):
        random_resized_crop=dict(scale=[0.9, 0.9], ratio=[1.0, 1.0]), random_brightness=[0.2],
        random_contrast=[0.8, 1.2], random_saturation=[0.8, 1.2], random_hue=[0.05], in that order;
  * applied after the resize to 224x224 (prismatic/vla/datasets/rlds/dataset.py:406-423), to training
    frames only (`if train:`), one seed per frame drawn from tf.random.uniform, each camera view with
    seed + i (prismatic/vla/datasets/rlds/obs_transforms.py:27-40);
  * dlimp/augmentations.py:65-126 `augment_image`: uint8 -> float [0, 1] (convert_image_dtype), each op
    with the SAME seed, a clip to [0, 1] after every op, then back to uint8 with convert_image_dtype
    (x * 255.5, truncated, saturated);
  * dlimp/augmentations.py:6-45 `random_resized_crop`: a box of area `scale` and aspect `ratio` at a random
    offset, cut with tf.image.crop_and_resize (bilinear, box corners on pixel centres) back to the input size;
  * brightness/contrast/saturation/hue are tf.image.stateless_random_* (dlimp/augmentations.py:53-62):
    x + delta; (x - per-channel mean) * factor + mean; HSV s * factor (clipped to [0, 1]); HSV h + delta
    (wrapped), the last two through TensorFlow's fused AdjustSaturation / AdjustHue kernels.

One consequence of "the same seed for every op" that this module keeps on purpose: TensorFlow's stateless
uniform draws with one seed and one shape return the same number, so every op of one image is driven by ONE
uniform u in [0, 1): the crop's row and column offsets are both u * (1 - sqrt(0.9)) (the box moves along the
diagonal), brightness is -0.2 + 0.4u, contrast and saturation 0.8 + 0.4u, hue -0.05 + 0.1u. The test checks
this against TensorFlow (reference_u in the fixture). `draw_params(..., coupled=False)` draws the five
independently instead (not what OpenVLA trained with; not exposed as a training option).

What differs from the reference, on purpose:
  * the random source: each sample's u comes from numpy's SeedSequence over (seed, epoch, sample index,
    view), not from a per-frame tf.random.uniform: the same whatever the number of data-loader workers,
    and reproducible (OpenVLA's is neither);
  * the crop is cut from the stored frame at its own size (e.g. 256x256 LIBERO, 480x640 DROID) before
    upstream's image processing, not from a 224x224 resize: the box is in normalized coordinates, so it
    covers the same part of the scene; the pixels differ from OpenVLA's by the order of two resamplings.

Pure: numpy and PIL only; no torch, no TensorFlow.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# openvla prismatic/vla/datasets/datasets.py:122-136
AUGMENT_ORDER = ("random_resized_crop", "random_brightness", "random_contrast", "random_saturation", "random_hue")
CROP_SCALE = 0.9          # random_resized_crop scale=[0.9, 0.9]: the box keeps 90% of the area
CROP_RATIO = 1.0          # ratio=[1.0, 1.0]: the box has the image's aspect (normalized coordinates)
BRIGHTNESS = 0.2          # random_brightness=[0.2]: delta in [-0.2, 0.2)
CONTRAST = (0.8, 1.2)     # random_contrast=[0.8, 1.2]
SATURATION = (0.8, 1.2)   # random_saturation=[0.8, 1.2]
HUE = 0.05                # random_hue=[0.05]: delta in [-0.05, 0.05) of a full turn
# openvla-oft experiments/robot/openvla_utils.py:596-626 center_crop_image: crop_scale = 0.9
CENTER_CROP_SCALE = 0.9


@dataclass(frozen=True)
class AugmentParams:
    """One image's augmentation, in the reference's terms (tf.image.crop_and_resize box order)."""

    crop_box: tuple[float, float, float, float]  # (y1, x1, y2, x2) in [0, 1], as tf.image.crop_and_resize takes it
    brightness: float   # added to [0, 1] pixel values
    contrast: float     # factor around each channel's mean
    saturation: float   # factor on HSV saturation
    hue: float          # added to HSV hue, in turns

    def as_dict(self) -> dict:
        return asdict(self)


def _crop_side(scale: float, ratio: float) -> tuple[np.float32, np.float32]:
    """dlimp/augmentations.py:21-22, in float32 as TensorFlow computes it: (height, width) of the box."""
    s, r = np.float32(scale), np.float32(ratio)
    return np.float32(min(max(np.sqrt(s / r), 0), 1)), np.float32(min(max(np.sqrt(s * r), 0), 1))


def params_from_uniform(u: float, v: tuple[float, ...] | None = None) -> AugmentParams:
    """The reference's parameters given its uniform draw(s).

    `u` alone: dlimp's coupled draw (every op sees the same u, module docstring). `v` = five uniforms
    (crop offset, brightness, contrast, saturation, hue) draws them independently; the crop's row and
    column offsets share v[0] either way, as in dlimp (same seed, same shape).
    """
    us = [np.float32(u)] * 5 if v is None else [np.float32(x) for x in v]
    if len(us) != 5 or not all(0.0 <= x < 1.0 for x in us):
        raise ValueError(f"uniform draws must be 5 numbers in [0, 1), got {us}")
    h, w = _crop_side(CROP_SCALE, CROP_RATIO)
    # tf.random.stateless_uniform(shape, seed, minval, maxval) = u * (maxval - minval) + minval, in float32
    y1, x1 = us[0] * (np.float32(1) - h), us[0] * (np.float32(1) - w)

    def between(x, lo, hi):
        return float(x * (np.float32(hi) - np.float32(lo)) + np.float32(lo))

    return AugmentParams(crop_box=(float(y1), float(x1), float(y1 + h), float(x1 + w)),
                         brightness=between(us[1], -BRIGHTNESS, BRIGHTNESS),
                         contrast=between(us[2], *CONTRAST), saturation=between(us[3], *SATURATION),
                         hue=between(us[4], -HUE, HUE))


def draw_params(seed: int, epoch: int, index: int, view: int = 0, coupled: bool = True) -> AugmentParams:
    """The parameters of sample `index` in `epoch` (camera `view`, OpenVLA's seed + i) under `seed`.

    A function of its arguments only (numpy SeedSequence hashes them), so a data-loader worker, however many
    there are, and a rerun draw the same parameters for the same sample; another epoch draws new ones.
    """
    key = [int(x) & 0xFFFFFFFFFFFFFFFF for x in (seed, epoch, index, view)]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
    if coupled:
        return params_from_uniform(float(rng.random(dtype=np.float32)))
    return params_from_uniform(0.0, tuple(float(x) for x in rng.random(5, dtype=np.float32)))


def centre_crop_box(scale: float = CENTER_CROP_SCALE) -> tuple[float, float, float, float]:
    """OFT's inference box (openvla-oft experiments/robot/openvla_utils.py:546-593 crop_and_resize): area
    `scale`, centred: offsets (1 - sqrt(scale)) / 2."""
    h, w = _crop_side(scale, 1.0)
    y1, x1 = (np.float32(1) - h) / np.float32(2), (np.float32(1) - w) / np.float32(2)
    return float(y1), float(x1), float(y1 + h), float(x1 + w)


# ---- the ops, on float32 HxWx3 images in [0, 1] -------------------------------------------------------------
def to_float(image) -> np.ndarray:
    """PIL image or HxWx3 uint8 array -> float32 in [0, 1] (tf.image.convert_image_dtype: x * (1/255))."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be an RGB PIL image or an (H, W, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.float32) * np.float32(1.0 / 255)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 as tf.image.convert_image_dtype(..., saturate=True): x * 255.5, saturated, truncated."""
    return np.clip(x.astype(np.float32) * np.float32(255.5), 0, 255).astype(np.uint8)


def crop_and_resize(x: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int] | None = None) -> np.ndarray:
    """tf.image.crop_and_resize for one box, bilinear (its default): output pixel (i, j) samples the input at
    y = y1 (H - 1) + i (y2 - y1) (H - 1) / (h - 1), x likewise (box corners on the corner pixels' centres).
    `size` = (h, w) of the output; default the input's (dlimp resizes back to the input size)."""
    H, W = x.shape[:2]
    h, w = size or (H, W)
    y1, x1, y2, x2 = (np.float32(v) for v in box)
    ys = (y1 * (H - 1) + np.arange(h, dtype=np.float32) * ((y2 - y1) * (H - 1) / np.float32(max(h - 1, 1)))) if h > 1 \
        else np.full(1, np.float32(0.5) * (y1 + y2) * (H - 1), np.float32)
    xs = (x1 * (W - 1) + np.arange(w, dtype=np.float32) * ((x2 - x1) * (W - 1) / np.float32(max(w - 1, 1)))) if w > 1 \
        else np.full(1, np.float32(0.5) * (x1 + x2) * (W - 1), np.float32)
    if ys.min() < 0 or ys.max() > H - 1 or xs.min() < 0 or xs.max() > W - 1:
        raise ValueError(f"crop box {box} reaches outside the image (it must lie in [0, 1])")
    top, left = np.floor(ys).astype(np.int64), np.floor(xs).astype(np.int64)
    bottom, right = np.ceil(ys).astype(np.int64), np.ceil(xs).astype(np.int64)
    dy, dx = (ys - top)[:, None, None], (xs - left)[None, :, None]
    tl, tr = x[top][:, left], x[top][:, right]
    bl, br = x[bottom][:, left], x[bottom][:, right]
    t = tl + (tr - tl) * dx
    b = bl + (br - bl) * dx
    return (t + (b - t) * dy).astype(np.float32)


def adjust_brightness(x: np.ndarray, delta: float) -> np.ndarray:
    """tf.image.adjust_brightness: x + delta."""
    return x + np.float32(delta)


def adjust_contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """tf.image.adjust_contrast: (x - mean) * factor + mean, the mean per channel over the image."""
    mean = x.mean(axis=(0, 1), keepdims=True, dtype=np.float64).astype(np.float32)
    return (x - mean) * np.float32(factor) + mean


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """TensorFlow's kernel conversion (adjust_saturation_op.cc rgb_to_hsv): h in [0, 1)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    rng = v - x.min(axis=-1)
    s = np.where(v > 0, rng / np.where(v > 0, v, 1), 0).astype(np.float32)
    norm = np.float32(1) / (np.float32(6) * np.where(rng > 0, rng, 1))
    h = np.where(r == v, norm * (g - b), np.where(g == v, norm * (b - r) + np.float32(2 / 6), norm * (r - g) + np.float32(4 / 6)))
    h = np.where(rng > 0, h, 0)
    h = np.where(h < 0, h + 1, h)
    return np.stack([h, s, v], axis=-1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """TensorFlow's kernel conversion (adjust_saturation_op.cc hsv_to_rgb), h in [0, 1)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    c = s * v
    m = v - c
    dh = h * np.float32(6)
    cat = np.floor(dh).astype(np.int64)
    fmodu = np.mod(dh, np.float32(2))
    xx = c * (1 - np.abs(fmodu - 1))
    z = np.zeros_like(c)
    table = [(c, xx, z), (xx, c, z), (z, c, xx), (z, xx, c), (xx, z, c), (c, z, xx)]
    out = np.zeros(hsv.shape, np.float32)
    for k, (rr, gg, bb) in enumerate(table):
        sel = cat == k
        out[..., 0] = np.where(sel, rr, out[..., 0])
        out[..., 1] = np.where(sel, gg, out[..., 1])
        out[..., 2] = np.where(sel, bb, out[..., 2])
    return out + m[..., None]


def adjust_saturation(x: np.ndarray, factor: float) -> np.ndarray:
    """tf.image.adjust_saturation: HSV s * factor, clipped to [0, 1]."""
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(factor), 0, 1)
    return hsv_to_rgb(hsv)


def adjust_hue(x: np.ndarray, delta: float) -> np.ndarray:
    """tf.image.adjust_hue: HSV h + delta, wrapped into [0, 1)."""
    hsv = rgb_to_hsv(x)
    h = hsv[..., 0] + np.float32(delta)
    hsv[..., 0] = np.mod(h, np.float32(1)) % np.float32(1)  # the second mod: -1e-9 % 1 rounds to 1.0 in float32
    return hsv_to_rgb(hsv)


def apply_float(x: np.ndarray, params: AugmentParams) -> np.ndarray:
    """dlimp's augment_image loop on a float [0, 1] image: each op in AUGMENT_ORDER, then a clip to [0, 1]."""
    ops = (lambda y: crop_and_resize(y, params.crop_box), lambda y: adjust_brightness(y, params.brightness),
           lambda y: adjust_contrast(y, params.contrast), lambda y: adjust_saturation(y, params.saturation),
           lambda y: adjust_hue(y, params.hue))
    for op in ops:
        x = np.clip(op(x), 0, 1)
    return x


def apply_params(image, params: AugmentParams) -> Image.Image:
    """Augment one image (PIL or HxWx3 uint8) with `params`; a new RGB PIL image of the same size."""
    return Image.fromarray(to_uint8(apply_float(to_float(image), params)), mode="RGB")


def augment_image(image, seed: int, epoch: int, index: int, view: int = 0) -> Image.Image:
    """draw_params + apply_params: what training does to sample `index`'s image in `epoch`."""
    return apply_params(image, draw_params(seed, epoch, index, view))


def center_crop(image, scale: float = CENTER_CROP_SCALE) -> Image.Image:
    """OFT's inference crop for a model trained with the random crop (openvla-oft
    experiments/robot/openvla_utils.py:596-626 center_crop_image): the centred box of area `scale`, resized back
    to the input size with tf.image.crop_and_resize, clipped, uint8 by convert_image_dtype. (OFT resizes to its
    224x224 input, which its images already have; ours keep their size for the backend's own processing.)"""
    x = to_float(image)
    return Image.fromarray(to_uint8(np.clip(crop_and_resize(x, centre_crop_box(scale)), 0, 1)), mode="RGB")
