"""Does the configuration fit, checked from the command line alone, before any weight is loaded.

A 7B run spends minutes loading weights (and a cluster allocation) before the dataset sees its first
sample; a `--model_max_length` below one frame's visual tokens for the chosen `--image_aspect_ratio`
and frame size can never train (upstream would truncate the action labels away), so it should fail
first, with the numbers. This module reads what decides the budget from the training arguments
(image_aspect_ratio, mm_patch_merge_type, image_grid_pinpoints, model_max_length, the action
representation), the vision tower's tile geometry from its config when it resolves offline
(siglip-so400m-384 otherwise), and the frame size of the first robot-action sample of each data file
(the image header only). The arithmetic is visual_tokens.py's. The dataset checks every sample again
later with the loaded model's real geometry (dataset.py); this check only catches what cannot fit at all.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from llava_vla_plugin.core.visual_tokens import SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE, VisualGeometry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameProbe:
    """One data file's first robot-action frame: where it came from and its (width, height)."""

    data_file: str
    image: str
    size: tuple[int, int]


def first_frames(data_path: str, image_folder: str | None) -> list[FrameProbe]:
    """The first robot-action sample's frame of each data file of `data_path` (a file or a mixture YAML).
    Reads one line per file and one image header; files or images that cannot be read are left to the
    dataset, which reports them with their sample."""
    from PIL import Image

    from data_tools.converted_format import is_action_sample
    from llava_vla_plugin.core.training_data import iter_raw_samples, parse_sources

    probes = []
    for src in parse_sources(data_path):
        try:
            for _, sample in iter_raw_samples(src.path):
                image = sample.get("image")
                if is_action_sample(sample) and isinstance(image, str):
                    with Image.open(os.path.join(image_folder or "", image)) as im:  # the header only
                        probes.append(FrameProbe(str(src.path), image, tuple(im.size)))
                    break
        except (OSError, ValueError):
            continue
    return probes


def tower_geometry(vision_tower: str | None) -> tuple[int, int, str]:
    """(image_size, patch_size, where from) of the vision tower, from its config if it resolves offline."""
    if vision_tower:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(vision_tower, local_files_only=True)
            vision = getattr(cfg, "vision_config", cfg)
            size, patch = int(vision.image_size), int(vision.patch_size)
            return size, patch, f"{vision_tower}'s config"
        except Exception as e:  # noqa: BLE001 - not resolvable offline: fall back, and say so
            log.info("fit check: %s's config does not resolve offline (%s); assuming siglip-so400m-384 tiles",
                     vision_tower, type(e).__name__)
    return SIGLIP_IMAGE_SIZE, SIGLIP_PATCH_SIZE, "siglip-so400m-384 default"


def fit_problem(geometry: VisualGeometry, model_max_length: int, frames: Sequence[FrameProbe],
                text_tokens: int) -> str | None:
    """Why the configuration cannot fit (the largest frame that does not), or None if every frame fits."""
    worst = None
    for f in frames:
        need = geometry.tokens(*f.size) + text_tokens
        if need > model_max_length and (worst is None or need > worst[0]):
            worst = (need, f)
    if worst is None:
        return None
    need, f = worst
    visual = need - text_tokens
    pad = VisualGeometry("pad", geometry.mm_patch_merge_type, image_size=geometry.image_size,
                         patch_size=geometry.patch_size).tokens(*f.size)
    return (f"--model_max_length {model_max_length} cannot fit one frame: {f.size[0]}x{f.size[1]} frames "
            f"(first sample of {f.data_file}, image {f.image}) take {visual} visual tokens under "
            f"image_aspect_ratio={geometry.image_aspect_ratio}, mm_patch_merge_type={geometry.mm_patch_merge_type} "
            f"({geometry.image_size}px tiles of {geometry.patch_size}px patches), plus at least {text_tokens} text "
            f"tokens = {need} positions; upstream would truncate the action labels away. Raise --model_max_length "
            f"to at least {need} (more for long instructions), or use image_aspect_ratio pad ({pad} visual tokens "
            f"per frame) or smaller frames. Checked before loading any weights.")


def _parse(argv: Sequence[str]):
    """Upstream's model and data arguments (our subclasses, so defaults match what train() will see) and
    --model_max_length, without building TrainingArguments (its __post_init__ sets up devices)."""
    import argparse

    import transformers

    from llava_vla_plugin.train.arguments import DataArguments, ModelArguments, TrainingArguments

    parser = transformers.HfArgumentParser((ModelArguments, DataArguments), allow_abbrev=False)
    model_args, data_args, rest = parser.parse_args_into_dataclasses(args=list(argv), return_remaining_strings=True)
    default = next(f.default for f in fields(TrainingArguments) if f.name == "model_max_length")
    extra = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    extra.add_argument("--model_max_length", type=int, default=default)
    known, _ = extra.parse_known_args(rest)
    return model_args, data_args, known.model_max_length


def _checkpoint_tower(model_name_or_path: str | None) -> str | None:
    """A local llava checkpoint's own tower (config.json mm_vision_tower), for runs that give no --vision_tower."""
    try:
        return json.loads((Path(model_name_or_path) / "config.json").read_text()).get("mm_vision_tower")
    except (OSError, ValueError, TypeError):
        return None


def check_config_fits(argv: Sequence[str]) -> str | None:
    """Raise register.ConfigurationError if no sample can fit; return a one-line summary of what was checked
    (None when there is nothing to check: no data path, no max length)."""
    from llava_vla_plugin.core.representations import PROMPT_FRAMING_TOKENS, ActionReprConfig, make_representation
    from llava_vla_plugin.train.register import ConfigurationError

    model_args, data_args, max_len = _parse(argv)
    if not data_args.data_path or not max_len:
        return None
    tower = model_args.vision_tower or _checkpoint_tower(model_args.model_name_or_path)
    size, patch, source = tower_geometry(tower)
    geometry = VisualGeometry.from_config(
        {"image_aspect_ratio": data_args.image_aspect_ratio, "mm_patch_merge_type": model_args.mm_patch_merge_type,
         "image_grid_pinpoints": data_args.image_grid_pinpoints}, image_size=size, patch_size=patch)
    text = PROMPT_FRAMING_TOKENS + make_representation(ActionReprConfig.from_args(data_args)).answer_tokens
    frames = first_frames(data_args.data_path, data_args.image_folder)
    problem = fit_problem(geometry, max_len, frames, text)
    if problem:
        raise ConfigurationError(f"{problem} (Tower geometry: {source}.)")
    sizes = sorted({f"{w}x{h}" for w, h in (f.size for f in frames)})
    return (f"fit check: model_max_length {max_len} fits {', '.join(sizes) or 'no robot-action frame'} under "
            f"image_aspect_ratio={geometry.image_aspect_ratio} (tower geometry: {source}; {len(frames)} data file(s))")
