"""VLADataset: upstream's LazySupervisedDataset, taught to read robot-action samples.

A sample whose assistant turn is a list of numbers is a VLA sample (our converter's format): its ids
and labels come from VLAPromptBuilder (tokenizer prepared once, labels on the action tokens and
`<|im_end|>` only). Any other sample goes through upstream's own code unchanged, so VLA data can be
co-trained with ordinary LLaVA instruction data. Upstream's silent "return sample i+1 on any error"
is replaced by an error naming the sample and file, or, with `--vla_skip_bad_samples`, a counted
and logged skip.

With `--vla_image_aug True` the training images of robot-action samples get OpenVLA's augmentation
(core/augment.py) before upstream's image processing: the stored files are only read, validation data
(is_eval) and non-action samples never change. Sample i's parameters come from (--vla_data_seed, the
trainer's epoch, i), so they do not depend on the number of data-loader workers; the trainer sets the epoch
(set_augment_epoch, from trainer.AugmentEpochCallback) before each epoch's workers start.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Any

import numpy as np
import torch
from llava.train.train import LazySupervisedDataset

from data_tools.converted_format import (SampleFormatError, is_action_sample, sample_action, sample_instruction,
                                         sample_wrist_image)
from llava_vla_plugin.core import augment
from llava_vla_plugin.core.representations import PROMPT_FRAMING_TOKENS, ActionReprConfig, make_representation
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.chunk_data import ProprioSource, WindowSource
from llava_vla_plugin.core.inputs import InputConfig, discretize_state, proprio_statistics, state_text
from llava_vla_plugin.core.training_data import find_statistics, load_data, training_domains
from llava_vla_plugin.core.prompt import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, VLAPromptBuilder
from llava_vla_plugin.core.visual_tokens import (PROMPT_TEXT_TOKENS_MIN, UPSTREAM_IMAGE_ASPECT_RATIO, VisualGeometry,
                                                 check_max_length, sample_budget)

log = logging.getLogger(__name__)

# --vla_skip_bad_samples stops after this many bad samples in a row: that is not a few damaged samples
# but wrong input (a wrong --image_folder, a model_max_length too short for every frame), and skipping
# on would train on nothing or on a biased remainder.
MAX_CONSECUTIVE_BAD = 50


class BadSampleError(ValueError):
    pass


def visual_geometry(tokenizer, data_args) -> VisualGeometry | None:
    """The model's visual-token geometry: set on the tokenizer by register.py's initialize_vision_tokenizer
    hook (it runs before the dataset is built and sees the model), or from data_args when a caller gives
    `mm_patch_merge_type` there; None (no budget check) when neither knows the model."""
    geometry = getattr(tokenizer, "vla_visual_geometry", None)
    if geometry is not None:
        return geometry
    merge = getattr(data_args, "mm_patch_merge_type", None)
    if merge is None:
        return None
    processor = getattr(data_args, "image_processor", None)
    size = getattr(processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else None
    return VisualGeometry.from_config(
        {"image_aspect_ratio": getattr(data_args, "image_aspect_ratio", UPSTREAM_IMAGE_ASPECT_RATIO), "mm_patch_merge_type": merge,
         "image_grid_pinpoints": getattr(data_args, "image_grid_pinpoints", None)}, image_size=side)


def _action_string(value: Any) -> bool:
    """An assistant turn holding a robot action as text ("[0.1, ...]"): it would be trained as text."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return False
    try:
        parsed = json.loads(value)
    except ValueError:
        return False
    return isinstance(parsed, list) and bool(parsed) and all(isinstance(a, (int, float)) for a in parsed)


def _sample_name(sample: dict, i: int) -> str:
    return f"sample {sample.get('id', i)!r} (index {i}) from {sample.get('_source', '?')}"


def ensure_image_token(sample: dict) -> dict:
    """A sample with an image must have exactly one <image> in its first human turn.

    Upstream never inserts it; without it the model encodes the image and throws the features away.
    Returns the sample unchanged or a corrected copy.
    """
    if "image" not in sample or isinstance(sample["image"], list):
        return sample
    conv = sample["conversations"]
    n = sum(str(c.get("value", "")).count(DEFAULT_IMAGE_TOKEN) for c in conv if c.get("from") in ("human", "user"))
    if n == 1:
        return sample
    if n > 1:
        raise BadSampleError(f"{n} <image> tokens for one image")
    fixed = copy.deepcopy(sample)
    first = fixed["conversations"][0]
    first["value"] = f"{DEFAULT_IMAGE_TOKEN}\n{first['value']}"
    return fixed


class VLADataset(LazySupervisedDataset):
    def __init__(self, data_path: str, tokenizer, data_args, *, is_eval: bool = False):
        torch.utils.data.Dataset.__init__(self)
        self.tokenizer = tokenizer
        self.data_args = data_args
        seed = int(getattr(data_args, "vla_data_seed", 0))
        self.list_data_dict, sources = load_data(data_path, seed=seed)
        self.dataset_statistics = find_statistics(sources)
        self.skip_bad_samples = bool(getattr(data_args, "vla_skip_bad_samples", False))
        self.skipped = 0
        self.model_max_length = int(getattr(tokenizer, "model_max_length", 0) or 0)
        self.geometry = visual_geometry(tokenizer, data_args)
        self.blind = bool(getattr(data_args, "vla_blind", False))
        # OpenVLA's train-time augmentation (core/augment.py): training data only, never the held-out set
        self.image_aug = bool(getattr(data_args, "vla_image_aug", False)) and not is_eval
        self.image_aug_seed, self.image_aug_epoch = seed, 0
        if self.image_aug:
            log.warning("VLADataset: --vla_image_aug: robot-action training images get OpenVLA's augmentation (random "
                        "crop 0.9, brightness, contrast, saturation, hue), parameters from seed %d, the epoch and the "
                        "sample index", seed)
        if self.blind:
            log.warning("VLADataset: --vla_blind: the <image> token is dropped; the model will NOT see its images")
        # The tokens were added to the model's tokenizer by register.add_action_tokens; binding is idempotent.
        self.action_tokenizer = ActionTokenizer()
        # The action representation (action_repr.py) makes the targets; binding its tokens is idempotent.
        self.action_repr = make_representation(ActionReprConfig.from_args(data_args), self.action_tokenizer)
        self.action_repr.bind(tokenizer)
        if self.action_repr.answer_tokens + PROMPT_FRAMING_TOKENS > PROMPT_TEXT_TOKENS_MIN:  # longer answers than `bins`
            check_max_length(tokenizer, PROMPT_FRAMING_TOKENS + self.action_repr.answer_tokens)
        # the views and the state the run trains on (core/inputs.py; --vla_cameras, --vla_proprio)
        self.inputs = InputConfig.from_args(data_args)
        self.prompt_builder = VLAPromptBuilder(tokenizer, self.action_tokenizer, n_views=self.inputs.n_views)
        self.proprio = ProprioSource() if self.inputs.proprio else None
        self._proprio_stats: dict[str, Any] = {}
        self.missing_views: dict[str, int] = {}  # dataset -> frames trained on OpenVLA's zero image for a missing view
        self.domain_of = None  # Re-Mix (enable_domains): each sample's domain index, sent as `vla_domain`
        self.windows = None
        if self.action_repr.horizon > 1:  # future-action windows from the per-episode sequences (chunk_data.py)
            self.windows = WindowSource(self.action_repr.horizon, self.action_repr.config.window_mode)
            keep = self.windows.keep_mask(self.list_data_dict)
            if not keep.all():
                log.warning("VLADataset: window mode %r, H=%d: %d of %d frames have no full window (the last H-1 of "
                            "each episode) and are not training samples", self.windows.mode, self.windows.horizon,
                            int((~keep).sum()), len(keep))
                self.list_data_dict = self.list_data_dict.select(keep)
        log.warning("VLADataset: %d samples from %s; statistics for %s",
                    len(self.list_data_dict), data_path, sorted(self.dataset_statistics) or "no dataset")
        if not self.list_data_dict:
            raise ValueError(f"no samples in {data_path}" + (" (the held-out data is empty: pass another VAL_DATA)" if is_eval else ""))
        if not self.inputs.is_default:
            self._check_inputs(data_path)
        self._check_budgets_before_training(sources)

    def _check_inputs(self, data_path: str) -> None:
        """Before any step, from the first robot-action sample of each data file: the state exists (with statistics
        over the real state, one width for every dataset), and which datasets lack the wrist view (OpenVLA's zero
        image for each of their frames, counted here and logged)."""
        from data_tools.converted_format import is_action_sample

        store, first = self.list_data_dict, {}
        counts: dict[str, int] = {}
        for i, k in enumerate(store.source_indices()):
            first.setdefault(int(k), i)
        per_source = np.bincount(store.source_indices(), minlength=len(store.source_paths))
        dims = {}
        for k, i in sorted(first.items()):
            sample = store[i]
            if not is_action_sample(sample):
                continue
            name = str(sample.get("dataset") or os.path.basename(os.path.dirname(sample["_source"])))
            if self.inputs.wrist and sample_wrist_image(sample) is None:
                counts[name] = counts.get(name, 0) + int(per_source[k])
            if self.proprio is not None:
                dims[name] = self.proprio.dim(sample)
                self._state_stats(name)
        if self.proprio is not None:
            if len(set(dims.values())) > 1:
                raise ValueError(f"PROPRIO=1: the datasets of {data_path} have states of different widths {dims}; a run "
                                 "takes one state width (train them separately, or leave PROPRIO unset)")
            self.inputs = self.inputs.with_proprio_dim(next(iter(dims.values())))
        for name, n in counts.items():
            log.warning("VLADataset: %s has no wrist camera: its %d frames get OpenVLA's zero (black) wrist image "
                        "(a missing camera in OpenVLA's restructure step)", name, n)
        self.missing_views = counts
        log.warning("VLADataset: inputs %s", self.inputs.describe())

    def _state_stats(self, dataset: str):
        entry = self._proprio_stats.get(dataset)
        if entry is None:
            entry = self._proprio_stats[dataset] = proprio_statistics(self.dataset_statistics, dataset, "PROPRIO=1")
        return entry

    def _check_budgets_before_training(self, sources) -> None:
        """Before any step: the first robot-action sample of each data file must fit model_max_length.

        Converted datasets have one frame size per dataset, so this finds a budget that cannot fit (e.g.
        anyres_max_9 at 480x640 with a short max length: every sample) before training rather than after
        hours of `loss 0.0`; every sample is checked again when it is loaded (_check_budget)."""
        if self.geometry is None or not self.model_max_length:
            return
        store, seen, first = self.list_data_dict, set(), []
        for i in range(len(store)):
            source = store[i].get("_source")
            if source not in seen:
                seen.add(source)
                first.append(i)
            if len(seen) == len(sources):
                break
        for i in first:
            sample = store[i]
            if not is_action_sample(sample) or "image" not in sample:
                continue
            path = os.path.join(self.data_args.image_folder or "", sample["image"])
            try:
                from PIL import Image

                with Image.open(path) as im:  # reads the header only
                    size = im.size
                input_ids, _, _ = self._vla_ids(sample)
            except Exception:  # noqa: BLE001 - a broken sample is reported (or skipped) when it is loaded
                continue
            try:
                self._check_budget(len(input_ids), [size] * self.inputs.n_views)
            except BadSampleError as e:
                msg = f"{_sample_name(sample, i)}: {e}"
                if not self.skip_bad_samples:
                    raise BadSampleError(msg + "\n  (checked before training on the first sample of each data file)") from None
                log.warning("before training: %s; such samples will be skipped and counted", msg)

    def _check_budget(self, n_input_ids: int, image_sizes) -> None:
        """Raise if the sample's text + visual tokens exceed model_max_length (upstream would truncate its labels).
        Several views are each one `pad` tile (upstream's multi-image rule; core/inputs.py)."""
        if self.geometry is None or not self.model_max_length:
            return
        geometry = self.geometry if len(image_sizes) == 1 else VisualGeometry(
            "pad", self.geometry.mm_patch_merge_type, self.geometry.image_grid_pinpoints)
        budget = sample_budget(n_input_ids, image_sizes, geometry)
        if budget.total > self.model_max_length:
            fix = (f"or use smaller frames or image_aspect_ratio pad ({VisualGeometry('pad').tokens(1, 1)} visual tokens "
                   "per frame)") if len(image_sizes) == 1 else (f"or fewer CAMERAS: each of the {len(image_sizes)} views "
                                                                 "is one pad tile, as upstream encodes multi-image input")
            raise BadSampleError(
                f"needs {budget.describe(geometry)} but --model_max_length is {self.model_max_length}: "
                f"upstream would truncate the action labels away and train on nothing. Raise --model_max_length "
                f"to at least {budget.total}, {fix}")

    # ---- Re-Mix domains (train/remix.py) ----------------------------------------------------------
    def enable_domains(self) -> tuple[list[str], list[int]]:
        """Every item from now on carries `vla_domain`, its dataset's index (core/training_data.training_domains);
        returns (domain names, samples per domain). Called by the trainer of a Re-Mix proxy run before the data-loader
        workers start."""
        domains, self.domain_of = training_domains(self.list_data_dict)
        counts = np.bincount(self.domain_of, minlength=len(domains)).tolist()
        return domains, counts

    # ---- image augmentation (--vla_image_aug) ----------------------------------------------------
    def set_augment_epoch(self, epoch: int) -> None:
        """The epoch that keys the augmentation parameters (trainer.AugmentEpochCallback calls it in the main
        process before the epoch's data-loader workers start; they copy the dataset with it)."""
        self.image_aug_epoch = int(epoch)

    def augment_params(self, i: int, view: int = 0) -> augment.AugmentParams:
        """Sample i's augmentation in the current epoch (camera `view`: OpenVLA's seed + i per view)."""
        return augment.draw_params(self.image_aug_seed, self.image_aug_epoch, i, view)

    def process_augmented_image(self, image_file: str, i: int, view: int = 0, mode: str | None = None):
        """upstream's process_image (llava/train/train.py LazySupervisedDataset.process_image) for sample i's
        image, augmented after it is read and before upstream's processing; same return value (tensor, the
        original size, "image"). The augmentation keeps the image's size, so the visual-token count is unchanged.
        Each camera view draws its own parameters (`view`, as OpenVLA augments each view with its own seed)."""
        from PIL import Image

        with Image.open(os.path.join(self.data_args.image_folder or "", image_file)) as im:
            image = im.convert("RGB")
        size = image.size
        image = augment.apply_params(image, self.augment_params(i, view))
        return self.process_pil(image, mode), size, "image"

    def process_pil(self, image, mode: str | None = None):
        """upstream's process_image body from its Image.open on, for an image already in memory (upstream reads
        the file itself, so there is no hook between the read and the processing). Kept the same branch for
        branch; tests/test_augment.py checks it equals upstream's process_image on the same file."""
        import llava.train.train as upstream_train
        from PIL import Image

        data_args, processor = self.data_args, self.data_args.image_processor
        mode = mode or data_args.image_aspect_ratio
        if mode == "highres":
            return upstream_train.process_highres_image(image, processor, data_args.image_grid_pinpoints)
        if mode == "anyres" or "anyres_max" in mode:
            return upstream_train.process_anyres_image(image, processor, data_args.image_grid_pinpoints)
        if mode == "crop_split":
            return upstream_train.process_highres_image_crop_split(image, data_args)
        if mode == "pad":
            width, height = image.size
            if width != height:
                side = max(width, height)
                square = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in processor.image_mean))
                square.paste(image, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
                image = square
        return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]

    def _views(self, sample: dict, i: int) -> list:
        """Every camera view of sample i, in CAMERA_ORDER, each one `pad` tile as upstream processes a multi-image
        sample (llava/train/train.py:1148-1152); a missing wrist view is OpenVLA's zero image, of the primary's size."""
        from PIL import Image

        views = []
        for v, name in enumerate(self.inputs.cameras):
            image_file = sample["image"] if name == "primary" else sample_wrist_image(sample)
            if image_file is None:
                with Image.open(os.path.join(self.data_args.image_folder or "", sample["image"])) as im:
                    size = im.size
                views.append((self.process_pil(Image.new("RGB", size), "pad"), size, "image"))
                continue
            path = os.path.join(self.data_args.image_folder or "", image_file)
            if not os.path.exists(path):
                raise BadSampleError(f"{name} image file {path} does not exist (check --image_folder)")
            if self.image_aug:
                views.append(self.process_augmented_image(image_file, i, v, "pad"))
            else:
                tensor, size, _ = self.process_image(image_file, "pad")
                views.append((tensor, size, "image"))
        return views

    # ---- lengths for length-grouped sampling (precomputed at load: no pass over the samples) -----
    @property
    def lengths(self):
        store = self.list_data_dict
        return (store.text_lengths() + 128 * store.has_media()).tolist()

    @property
    def modality_lengths(self):
        store = self.list_data_dict
        n = store.text_lengths()
        positive = store.has_media() | bool(self.data_args.early_mix_text)
        return np.where(positive, n, -n).tolist()

    # ---- items ---------------------------------------------------------------------------------
    def __getitem__(self, i) -> dict[str, Any]:
        n = len(self)
        limit = min(n, MAX_CONSECUTIVE_BAD)
        for attempt in range(limit):
            # With --vla_skip_bad_samples the substitute is the next sample, deterministically (a loop, not
            # recursion: a long run of bad samples must end in the error below, not in RecursionError).
            j = (int(i) + attempt) % n
            try:
                item = self._get_checked(j)
                if self.domain_of is not None:  # the sample actually returned (j), also when a bad one was skipped
                    item["vla_domain"] = int(self.domain_of[j])
                return item
            except Exception as e:  # noqa: BLE001 - every failure is reported with the sample's name
                msg = f"{_sample_name(self.list_data_dict[j], j)}: {type(e).__name__}: {e}"
                if not self.skip_bad_samples:
                    raise BadSampleError(msg + "\n  (fix or remove the sample, or pass --vla_skip_bad_samples True to count and skip such samples)") from e
                self.skipped += 1
                log.warning("skipping bad sample #%d: %s", self.skipped, msg)
        raise BadSampleError(
            f"{limit} samples in a row (indices {int(i) % n}..{(int(i) + limit - 1) % n}) are bad; the last: {msg}\n"
            "  --vla_skip_bad_samples skips a few damaged samples, not wrong input: check --image_folder, "
            "--data_path and --model_max_length")

    def _get_checked(self, i: int) -> dict[str, Any]:
        sample = self.list_data_dict[i]
        conv = sample.get("conversations") or []
        if len(conv) >= 2 and _action_string(conv[1].get("value")):
            raise BadSampleError("the action is a string, not a JSON list of numbers: it would be trained as text "
                                 "(write the assistant turn as a list, as data_tools.convert does)")
        if not is_action_sample(sample):
            fixed = ensure_image_token(sample)
            if fixed is not sample:
                self.list_data_dict[i] = fixed
            return self._get_item(i)
        return self._get_vla_item(i, sample)

    def _vla_ids(self, sample: dict):
        """(input_ids, labels, extra targets) of a robot-action sample, after checking the action and the human turn."""
        human = sample["conversations"][0].get("value", "")
        action = sample_action(sample)
        if len(action) != self.action_tokenizer.action_dim:
            raise BadSampleError(f"action has {len(action)} values, expected {self.action_tokenizer.action_dim}")
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in action):
            raise BadSampleError(f"action has non-numeric, boolean or non-finite values: {action}")
        n_image = str(human).count(DEFAULT_IMAGE_TOKEN)
        if n_image > 1:
            raise BadSampleError(f"the human turn has {n_image} {DEFAULT_IMAGE_TOKEN} tokens; a robot-action sample "
                                 "has one image and one")
        try:
            instruction = sample_instruction(sample, self.action_tokenizer.prompt)
        except SampleFormatError as e:
            raise BadSampleError(str(e)) from None
        window = self.windows.window(sample) if self.windows is not None else np.asarray([action], dtype=np.float64)
        builder = self.prompt_builder
        if self.proprio is not None:  # the state as text in the user turn (core/inputs.py)
            name = str(sample.get("dataset") or os.path.basename(os.path.dirname(sample.get("_source", ""))))
            builder = builder.with_state(state_text(discretize_state(self.proprio.state(sample), self._state_stats(name))))
        return self.action_repr.build(builder, instruction, window)

    def _get_vla_item(self, i: int, sample: dict) -> dict[str, Any]:
        input_ids, labels, extra = self._vla_ids(sample)
        if self.blind:
            keep = input_ids != IMAGE_TOKEN_INDEX
            input_ids, labels = input_ids[keep], labels[keep]
        out: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels), **extra}
        if "image" in sample:
            image_file = sample["image"]
            path = os.path.join(self.data_args.image_folder or "", image_file)
            if not os.path.exists(path):
                raise BadSampleError(f"image file {path} does not exist (check --image_folder)")
            if self.inputs.n_views == 1:
                out["image"] = [self.process_augmented_image(image_file, i) if self.image_aug else self.process_image(image_file)]
            else:
                out["image"] = self._views(sample, i)
            if not self.blind:  # blind: no image placeholder, so no visual tokens
                self._check_budget(len(input_ids), [im[1] for im in out["image"]])
        elif self.data_args.is_multimodal:
            raise BadSampleError("robot-action sample without an image")
        out["id"] = sample.get("id", i)
        return out

