"""How many positions one image takes in the language model, and a sample's whole token budget.

Upstream LLaVA-NeXT decides the visual-token count deep inside `prepare_inputs_labels_for_multimodal`
(llava/model/llava_arch.py at df17966) from the frame size, `image_aspect_ratio`, `mm_patch_merge_type`
and the grid pinpoints, and then truncates the whole sequence to `tokenizer_model_max_length` without a
word: a sample that does not fit loses its action labels and trains on nothing. This module reproduces
that arithmetic without a model (pure integer code, no torch), so a budget that cannot fit is found before
training (dataset.py) or before weights are loaded (a launcher's config check), naming the numbers.

Reproduced from upstream (tests compare with the real tiny model's feature count for several sizes/modes):
- non-anyres (`pad`, `square`, ...): one tile of P x P patches (P = tower image size / patch size, 27 for
  siglip-so400m-384), plus one `image_newline` with an `unpad` merge type: 730 for `pad`.
- `anyres` / `anyres_max_N` (spatial merge): the base tile (P*P) plus the grid tiles of the best-fitting
  pinpoint resolution (mm_utils.select_best_resolution), unpadded back to the frame's aspect ratio
  (llava_arch.unpad_image), with `anyres_max_N` shrunk by `times = sqrt(h*w / (N*P*P))` when times > 1.1,
  and one newline per row: 256x320 -> 1317, 480x640 -> 2929, 256x256 -> 1485 (OneVision defaults).
- `flat` merge: every tile's P*P patches, no newlines.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

# OneVision's defaults: siglip-so400m-patch14-384 and grid pinpoints (1x1)..(6x6) of 384 px tiles.
SIGLIP_IMAGE_SIZE = 384
SIGLIP_PATCH_SIZE = 14
OV_GRID_PINPOINTS = "(1x1),...,(6x6)"

# The documented counts per frame (docs/DESIGN.md section 3; siglip-so400m-384, spatial_unpad), kept here as
# literal data beside the formula that must reproduce them: tests/test_fit_check.py checks the formula against
# this table and tests/test_real_arch.py the real model's features. (mode, (height, width) or None) -> tokens.
DOCUMENTED_VISUAL_TOKENS = {("pad", None): 730, ("anyres_max_9", (256, 320)): 1317,
                            ("anyres_max_9", (480, 640)): 2929, ("anyres_max_9", (256, 256)): 1485}


def _pinpoints(spec: Any, tile: int) -> list[tuple[int, int]]:
    """upstream train.py / mm_utils: "(1x1),...,(6x6)" -> every (i*tile, j*tile); or a literal list."""
    if isinstance(spec, str) and "x" in spec:
        matches = re.findall(r"\((\d+)x(\d+)\)", spec)
        (a0, b0), (a1, b1) = tuple(map(int, matches[0])), tuple(map(int, matches[-1]))
        return [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    if isinstance(spec, str):
        spec = ast.literal_eval(spec)
    return [(int(w), int(h)) for w, h in spec]


def _best_resolution(size: tuple[int, int], candidates: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """mm_utils.select_best_resolution: most effective pixels, then least waste. size is (width, height)."""
    ow, oh = size
    best, best_eff, best_waste = None, 0, float("inf")
    for w, h in candidates:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (w, h), eff, waste
    assert best is not None
    return best


def _unpadded(rows: int, cols: int, size: tuple[int, int]) -> tuple[int, int]:
    """llava_arch.unpad_image on a rows x cols feature map of a frame of size (width, height)."""
    ow, oh = size
    if ow / oh > cols / rows:  # padding was added to the height
        new = int(oh * (cols / ow))
        pad = (rows - new) // 2
        return rows - 2 * pad, cols
    new = int(ow * (rows / oh))
    pad = (cols - new) // 2
    return rows, cols - 2 * pad


# What upstream does where nothing names the mode: DataArguments.image_aspect_ratio = "square"
# (llava/train/train.py:125 at df17966), copied into model.config by train.py:1583. The one default every
# reader here uses (a config or data_args without the field); the launcher's own default is anyres_max_9.
UPSTREAM_IMAGE_ASPECT_RATIO = "square"


@dataclass(frozen=True)
class VisualGeometry:
    """What decides the visual-token count: the model config's fields plus the tower's tile geometry.
    The mode has no default here: callers name it, or read it with UPSTREAM_IMAGE_ASPECT_RATIO's rule."""

    image_aspect_ratio: str
    mm_patch_merge_type: str = "spatial_unpad"
    image_grid_pinpoints: Any = OV_GRID_PINPOINTS
    image_size: int = SIGLIP_IMAGE_SIZE  # the tower's input side (one tile)
    patch_size: int = SIGLIP_PATCH_SIZE

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, config: Any, image_size: int | None = None, patch_size: int | None = None) -> "VisualGeometry":
        """From a llava model config (object or dict, e.g. config.json); tower sizes default to siglip-384."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        pinpoints = get("image_grid_pinpoints") or OV_GRID_PINPOINTS
        return cls(
            image_aspect_ratio=str(get("image_aspect_ratio") or UPSTREAM_IMAGE_ASPECT_RATIO),
            mm_patch_merge_type=str(get("mm_patch_merge_type") or "flat"),
            image_grid_pinpoints=pinpoints,
            image_size=int(image_size or SIGLIP_IMAGE_SIZE),
            patch_size=int(patch_size or SIGLIP_PATCH_SIZE),
        )

    @classmethod
    def from_model(cls, model: Any) -> "VisualGeometry":
        """From a loaded llava model: its config and its vision tower's real tile geometry."""
        tower = model.get_vision_tower()
        side = int(getattr(tower, "image_size", SIGLIP_IMAGE_SIZE))
        per_side = int(getattr(tower, "num_patches_per_side", side // SIGLIP_PATCH_SIZE))
        return cls.from_config(model.config, image_size=side, patch_size=side // per_side)

    @property
    def anyres(self) -> bool:
        return self.image_aspect_ratio == "anyres" or "anyres_max" in self.image_aspect_ratio

    def tokens(self, width: int, height: int) -> int:
        """Visual positions one frame of width x height takes in the language model."""
        p = self.patches_per_side
        merge = self.mm_patch_merge_type
        unpad = "unpad" in merge
        if not self.anyres:  # a single tile
            return p * p + (1 if unpad and merge.startswith("spatial") else 0)
        cols, rows = _best_resolution((width, height), _pinpoints(self.image_grid_pinpoints, self.image_size))
        cols, rows = cols // self.image_size, rows // self.image_size  # get_anyres_image_grid_shape
        base = 0 if "nobase" in merge else p * p
        if merge == "flat":
            return p * p * (1 + rows * cols)
        if not merge.startswith("spatial"):
            raise ValueError(f"mm_patch_merge_type {merge!r} is not one upstream supports")
        if "maxpool2x2" in merge:
            return base + (rows * p // 2) * (cols * p // 2)
        if not unpad:
            return base + rows * cols * p * p
        h, w = _unpadded(rows * p, cols * p, (width, height))
        m = re.match(r"anyres_max_(\d+)", self.image_aspect_ratio)
        if m:
            times = math.sqrt(h * w / (int(m.group(1)) * p * p))
            if times > 1.1:
                h, w = int(h // times), int(w // times)
        return base + h * (w + 1)


@dataclass(frozen=True)
class TokenBudget:
    """One sample's positions in the language model: its text tokens plus its images' visual tokens."""

    text_tokens: int  # input ids without the image placeholders
    visual_tokens: int
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each image

    @property
    def total(self) -> int:
        return self.text_tokens + self.visual_tokens

    def describe(self, geometry: VisualGeometry) -> str:
        frames = ", ".join(f"{w}x{h}" for w, h in self.image_sizes) or "no image"
        return (f"{self.total} positions = {self.text_tokens} text + {self.visual_tokens} visual tokens "
                f"({frames} frame(s), image_aspect_ratio={geometry.image_aspect_ratio}, "
                f"mm_patch_merge_type={geometry.mm_patch_merge_type})")


def sample_budget(text_tokens_with_placeholders: int, image_sizes: Sequence[tuple[int, int]],
                  geometry: VisualGeometry) -> TokenBudget:
    """The budget of a sample whose input ids hold one image placeholder per image in `image_sizes`."""
    sizes = tuple((int(w), int(h)) for w, h in image_sizes)
    return TokenBudget(text_tokens_with_placeholders - len(sizes), sum(geometry.tokens(w, h) for w, h in sizes), sizes)


# One frame under `pad` with OneVision's tower (any frame size: pad makes it one square tile): 730.
PAD_VISUAL_TOKENS = VisualGeometry("pad", "spatial_unpad").tokens(SIGLIP_IMAGE_SIZE, SIGLIP_IMAGE_SIZE)

# system + user framing + the answer, without the instruction; the answer's length is the action
# representation's (action_repr.py): 7 action tokens + <|im_end|> for `bins`
PROMPT_TEXT_TOKENS_MIN = 48


class ConfigurationError(ValueError):
    """A training configuration that cannot work (raised before any weight loads where possible)."""


def check_max_length(tokenizer, text_tokens: int = PROMPT_TEXT_TOKENS_MIN) -> None:
    """`text_tokens`: framing + the action representation's answer (VLADataset asks its representation)."""
    max_len = int(getattr(tokenizer, "model_max_length", 0) or 0)
    need = PAD_VISUAL_TOKENS + text_tokens
    if max_len < need:
        raise ConfigurationError(f"--model_max_length {max_len} is below one image's {PAD_VISUAL_TOKENS} visual tokens + "
                                 f"{text_tokens} text tokens; the action labels would be truncated away. "
                                 f"Use at least {need} for image_aspect_ratio=pad; anyres_max_9 needs ~1500-3000 "
                                 f"for 256x256..480x640 frames (4096 is safe)")
