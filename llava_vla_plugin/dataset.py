"""VLADataset: upstream's LazySupervisedDataset, taught to read robot-action samples.

A sample whose assistant turn is a list of numbers is a VLA sample (our converter's format): its ids
and labels come from VLAPromptBuilder (tokenizer prepared once, labels on the action tokens and
`<|im_end|>` only). Any other sample goes through upstream's own code unchanged, so VLA data can be
co-trained with ordinary LLaVA instruction data. Upstream's silent "return sample i+1 on any error"
is replaced by an error naming the sample and file, or, with `--vla_skip_bad_samples`, a counted
and logged skip.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from typing import Any

import numpy as np
import torch
from llava.train.train import LazySupervisedDataset

from data_tools.converted_format import SampleFormatError, is_action_sample, sample_action, sample_instruction
from llava_vla_plugin.action_repr import PROMPT_FRAMING_TOKENS, ActionReprConfig, make_representation
from llava_vla_plugin.action_tokenizer import ActionTokenizer
from llava_vla_plugin.chunk_data import WindowSource
from llava_vla_plugin.data_files import find_statistics, load_data
from llava_vla_plugin.register import PROMPT_TEXT_TOKENS_MIN, check_max_length
from llava_vla_plugin.prompt import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX, VLAPromptBuilder

log = logging.getLogger(__name__)


class BadSampleError(ValueError):
    pass

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
        if not is_eval:
            data_args.dataset_paths = [str(s.path) for s in sources]
        self.dataset_statistics = find_statistics(sources)
        self.skip_bad_samples = bool(getattr(data_args, "vla_skip_bad_samples", False))
        self.skipped = 0
        self.blind = bool(getattr(data_args, "vla_blind", False))
        if self.blind:
            log.warning("VLADataset: --vla_blind: the <image> token is dropped; the model will NOT see its images")
        # The tokens were added to the model's tokenizer by register.add_action_tokens; binding is idempotent.
        self.action_tokenizer = ActionTokenizer()
        # The action representation (action_repr.py) makes the targets; binding its tokens is idempotent.
        self.action_repr = make_representation(ActionReprConfig.from_args(data_args), self.action_tokenizer)
        self.action_repr.bind(tokenizer)
        if self.action_repr.answer_tokens + PROMPT_FRAMING_TOKENS > PROMPT_TEXT_TOKENS_MIN:  # longer answers than `bins`
            check_max_length(tokenizer, PROMPT_FRAMING_TOKENS + self.action_repr.answer_tokens)
        self.prompt_builder = VLAPromptBuilder(tokenizer, self.action_tokenizer)
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
        try:
            return self._get_checked(i)
        except Exception as e:  # noqa: BLE001 - every failure is reported with the sample's name
            sample = self.list_data_dict[i]
            msg = f"{_sample_name(sample, i)}: {type(e).__name__}: {e}"
            if not self.skip_bad_samples:
                raise BadSampleError(msg + "\n  (fix or remove the sample, or pass --vla_skip_bad_samples True to count and skip such samples)") from e
            self.skipped += 1
            log.warning("skipping bad sample #%d: %s", self.skipped, msg)
            # The substitute is the next sample, deterministically; the skip is counted and logged.
            return self[(i + 1) % len(self)]

    def _get_checked(self, i: int) -> dict[str, Any]:
        sample = self.list_data_dict[i]
        if not is_action_sample(sample):
            fixed = ensure_image_token(sample)
            if fixed is not sample:
                self.list_data_dict[i] = fixed
            return self._get_item(i)
        return self._get_vla_item(i, sample)

    def _get_vla_item(self, i: int, sample: dict) -> dict[str, Any]:
        action = sample_action(sample)
        if len(action) != self.action_tokenizer.action_dim:
            raise BadSampleError(f"action has {len(action)} values, expected {self.action_tokenizer.action_dim}")
        if not all(isinstance(a, (int, float)) and math.isfinite(a) for a in action):
            raise BadSampleError(f"action has non-numeric or non-finite values: {action}")
        try:
            instruction = sample_instruction(sample, self.action_tokenizer.prompt)
        except SampleFormatError as e:
            raise BadSampleError(str(e)) from None
        window = self.windows.window(sample) if self.windows is not None else np.asarray([action], dtype=np.float64)
        input_ids, labels, extra = self.action_repr.build(self.prompt_builder, instruction, window)
        if self.blind:
            keep = input_ids != IMAGE_TOKEN_INDEX
            input_ids, labels = input_ids[keep], labels[keep]
        out: dict[str, Any] = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels), **extra}
        if "image" in sample:
            image_file = sample["image"]
            path = os.path.join(self.data_args.image_folder or "", image_file)
            if not os.path.exists(path):
                raise BadSampleError(f"image file {path} does not exist (check --image_folder)")
            out["image"] = [self.process_image(image_file)]
        elif self.data_args.is_multimodal:
            raise BadSampleError("robot-action sample without an image")
        out["id"] = sample.get("id", i)
        return out

