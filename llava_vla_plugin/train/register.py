"""Install the VLA hooks into upstream LLaVA-NeXT (idempotent).

upstream train() looks these names up in `llava.train.train` at call time, so they are replaced
there (docs/DESIGN.md section 3): LLaVATrainer, LazySupervisedDataset, the three argument dataclasses;
two methods of LlavaMetaForCausalLM: initialize_vision_tokenizer (runs before the dataset is
built: the action tokens are added here) and prepare_inputs_labels_for_multimodal (where a too
small model_max_length silently cuts the action labels off); and LlavaQwenForCausalLM.forward,
whose training path runs the LM head on labelled positions only (sparse_head.py); upstream's LoRA
state-dict helpers, so its final LoRA save keeps the action-token rows (lora.py).
"""
from __future__ import annotations

import logging

from llava_vla_plugin.core.env import apply_env_defaults
from llava_vla_plugin.core.visual_tokens import (PAD_VISUAL_TOKENS, ConfigurationError,  # noqa: F401 (callers name it as register's)
                                            VisualGeometry, check_max_length)
from llava_vla_plugin.core.zero import gathered

log = logging.getLogger(__name__)
_registered = False

# check_max_length and ConfigurationError are visual_tokens.py's (the token budget's owner), as is
# PROMPT_TEXT_TOKENS_MIN; imported here for the guards below and for callers that name them as register's.


def register() -> None:
    global _registered
    if _registered:
        return
    apply_env_defaults()
    import llava.train.train as upstream_train
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM
    from llava.model.llava_arch import LlavaMetaForCausalLM

    from llava_vla_plugin.train import lora

    from llava_vla_plugin.train import sparse_head
    from llava_vla_plugin.train.arguments import DataArguments, ModelArguments, TrainingArguments
    from llava_vla_plugin.train.dataset import VLADataset
    from llava_vla_plugin.train.trainer import VLATrainer

    upstream_train.ModelArguments = ModelArguments
    upstream_train.DataArguments = DataArguments
    upstream_train.TrainingArguments = TrainingArguments
    upstream_train.LLaVATrainer = VLATrainer
    upstream_train.LazySupervisedDataset = VLADataset
    upstream_train.DataCollatorForSupervisedDataset = _collator_class(upstream_train.DataCollatorForSupervisedDataset)

    original_init_tokenizer = LlavaMetaForCausalLM.initialize_vision_tokenizer
    original_prepare = LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal

    def initialize_vision_tokenizer(self, model_args, tokenizer):
        check_configuration(model_args, tokenizer, self.config)
        original_init_tokenizer(self, model_args, tokenizer)
        add_action_tokens(self, tokenizer)
        # The dataset, built next from this tokenizer, checks each sample's text + visual token budget
        # against model_max_length with the model's real geometry (llava_vla_plugin/core/visual_tokens.py).
        tokenizer.vla_visual_geometry = VisualGeometry.from_model(self)

    def prepare_inputs_labels_for_multimodal(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, *args, **kwargs):
        out = original_prepare(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, *args, **kwargs)
        if labels is not None:
            check_labels_survived(labels, out[5], self.config)
        return out

    sparse_head.install(LlavaQwenForCausalLM)
    lora.install_upstream_save_hooks()
    LlavaMetaForCausalLM.initialize_vision_tokenizer = initialize_vision_tokenizer
    LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
    _registered = True
    log.info("llava_vla_plugin registered into upstream LLaVA-NeXT")


def check_configuration(model_args, tokenizer, config) -> None:
    from llava import conversation as conversation_lib

    if getattr(model_args, "mm_use_im_patch_token", False):
        raise ConfigurationError("--mm_use_im_patch_token True adds a token Qwen models never use and makes upstream "
                                 "shrink the embedding matrix; pass --mm_use_im_patch_token False")
    version = getattr(model_args, "version", None)
    if version not in conversation_lib.conv_templates:
        raise ConfigurationError(f"--version {version!r} is not a conversation template; upstream would silently use "
                                 f"vicuna_v1. Known: {', '.join(sorted(conversation_lib.conv_templates))} (use qwen_1_5)")
    check_max_length(tokenizer)


def check_labels_survived(labels, new_labels, config) -> None:
    """Upstream truncates embeddings and labels to tokenizer_model_max_length without a word."""
    from data_tools.converted_format import IGNORE_INDEX

    before = int((labels != IGNORE_INDEX).sum())
    after = int((new_labels != IGNORE_INDEX).sum())
    if after < before:
        limit = getattr(config, "tokenizer_model_max_length", None)
        raise ConfigurationError(
            f"model_max_length={limit} truncated {before - after} of {before} labelled tokens in this batch: "
            f"visual + text tokens exceed it (image_aspect_ratio={getattr(config, 'image_aspect_ratio', '?')}, "
            f"{new_labels.shape[1]} positions after truncation). Raise --model_max_length (pad needs ~{PAD_VISUAL_TOKENS}"
            " visual tokens, anyres_max_9 up to ~3000 for 480x640 frames)")


def add_action_tokens(model, tokenizer) -> int:
    """Add the action tokens once; new embedding rows start at the mean of the existing vocabulary.

    Tokens already in the tokenizer (continuing from a VLA checkpoint) keep their trained rows. The
    spare rows Qwen2 reserves past len(tokenizer) are untrained, so the mean is over real tokens only.
    Works with ZeRO-3 partitioned parameters (gathered, modified on rank 0, re-partitioned).
    """
    import torch

    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    at = ActionTokenizer()
    n_before = len(tokenizer)
    added = at.add_to_tokenizer(tokenizer)
    if not added:
        log.warning("action tokens already in the tokenizer (ids %d..%d): keeping their embeddings", at.token_ids[0], at.token_ids[-1])
        return 0
    in_emb = model.get_input_embeddings().weight
    rows = in_emb.ds_shape[0] if hasattr(in_emb, "ds_shape") else in_emb.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
    params = [model.get_input_embeddings().weight]
    out_emb = model.get_output_embeddings()
    if out_emb is not None and out_emb.weight is not params[0]:
        params.append(out_emb.weight)
    new = slice(at.token_ids[0], at.token_ids[-1] + 1)
    with gathered(params):
        with torch.no_grad():
            for p in params:
                if p.numel():  # ranks other than 0 see empty tensors under ZeRO-3 gather with modifier_rank
                    p.data[new] = p.data[:n_before].mean(dim=0, keepdim=True).to(p.dtype)
    log.warning("added %d action tokens (ids %d..%d), embeddings initialised to the vocabulary mean", added, at.token_ids[0], at.token_ids[-1])
    return added


def _collator_class(base):
    """Upstream's collator keeps input_ids/labels/images only; regression representations also need their
    continuous targets (`action_targets`, one [H, D] per VLA sample, in batch order)."""

    class VLACollator(base):
        def __call__(self, instances):
            batch = super().__call__(instances)
            targets = [inst["action_targets"] for inst in instances if "action_targets" in inst]
            if targets:
                import torch

                batch["action_targets"] = torch.stack(targets)
            if instances and "vla_domain" in instances[0]:  # Re-Mix proxy runs (train/remix.py): each sample's dataset
                import torch

                batch["vla_domain"] = torch.tensor([inst["vla_domain"] for inst in instances], dtype=torch.long)
            return batch

    VLACollator.__name__ = VLACollator.__qualname__ = "VLACollator"
    return VLACollator
