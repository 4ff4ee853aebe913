"""The `upstream` backend of the policy pipeline (infer/pipeline.py): upstream LLaVA-NeXT's model and image code.

What this backend does (docs/DESIGN.md 2.3-2.6; the rest of the pipeline is pipeline.Policy's):
  * the checkpoint loads with plain upstream `load_pretrained_model(path, None, "llava_qwen")`, or as a
    LoRA checkpoint through train/lora.py;
  * the image goes through upstream's `process_images` with the checkpoint's `image_aspect_ratio`,
    and is handed to the model as a list of per-image tensors, as the training collator does (a
    stacked 4-d tensor would take upstream's other branch and drop the image-newline token);
  * generation is greedy under the pipeline's constraint. The generation config is built here and the
    checkpoint's generation_config.json is ignored (`use_model_defaults=False`), so no sampling settings
    leak in;
  * parallel_l1's one forward: prompt + placeholders + slot embeddings -> hidden states -> the head.
Batches are left-padded.
Speed: upstream's forward makes generate() compute the LM head over every prompt position; the
backend gives its model instance a forward that computes it at the last position only
(`keep_last_logits_only`, on by default: ~2.4x faster on the tiny CPU model, and 0.5-1.8 GB less
fp32 logits per sample on real ones). `last_logits_only=False` keeps upstream's forward untouched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig

from llava_vla_plugin.core.representations import ActionRepresentation, head_host
from llava_vla_plugin.train import lora


def keep_last_logits_only(model) -> bool:
    """Let generate() compute the LM head at the last position only during prefill.

    Upstream's LlavaQwenForCausalLM.forward has no `logits_to_keep` argument, so transformers'
    generate() computes logits over the whole prompt (~760 positions x 152k ids with `pad`, ~3000
    with anyres: 0.5-1.8 GB of fp32 per sample) and keeps only the last row. This gives the model
    instance a forward with the same behaviour plus `logits_to_keep` (passed to the Qwen2 base
    forward, which supports it). The numbers of the last position are unchanged. Returns whether
    the instance was changed (False where the model already supports it or its base does not).
    """
    import inspect

    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return False
    base_forward = super(type(model), model).forward
    if "logits_to_keep" not in inspect.signature(base_forward).parameters:
        return False

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, images=None, image_sizes=None, modalities=("image",),
                cache_position=None, logits_to_keep=0, dpo_forward=False, **kwargs):
        if dpo_forward:
            raise NotImplementedError("dpo_forward is not supported by the inference forward")
        if inputs_embeds is None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds, labels) = \
                model.prepare_inputs_labels_for_multimodal(input_ids, position_ids, attention_mask, past_key_values,
                                                           labels, images, list(modalities), image_sizes)
        return base_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, cache_position=cache_position, logits_to_keep=logits_to_keep, **kwargs)

    model.forward = forward
    return True


@dataclass
class PreparedInputs:
    """What generate() gets: the same for predict_action and for a bare model.generate call."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: list
    image_sizes: list
    modalities: list

    def generate_kwargs(self) -> dict:
        return {"inputs": self.input_ids, "attention_mask": self.attention_mask, "images": self.images,
                "image_sizes": self.image_sizes, "modalities": self.modalities}




class UpstreamBackend:
    """Runs a checkpoint through upstream LLaVA-NeXT (module docstring). Every representation."""

    kind = "upstream"
    decodings = ("tokens", "placeholders")  # the representations' `decoding` values this backend runs

    def __init__(self, model, tokenizer, image_processor, last_logits_only: bool = True):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        # Batches are left-padded for generation (upstream pads by this config field).
        model.config.tokenizer_padding_side = "left"
        # an unmerged LoRA model (PEFT wrapper) generates through its base model's forward
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.last_logits_only = keep_last_logits_only(base) if last_logits_only else False
        self.generation_config: GenerationConfig | None = None

    @staticmethod
    def check_supports(path: Path, action_repr: ActionRepresentation) -> None:
        if action_repr.decoding not in UpstreamBackend.decodings:
            raise ValueError(f"{path}: representation {action_repr.name!r} decodes by {action_repr.decoding!r}, which the "
                             f"upstream backend does not run ({', '.join(UpstreamBackend.decodings)})")

    @classmethod
    def load(cls, path: Path, action_repr: ActionRepresentation, device: str, dtype: torch.dtype,
             attn_implementation: str | None = None, last_logits_only: bool = True, base_model: str | None = None,
             merge_lora: bool = True) -> "UpstreamBackend":
        """Plain upstream `load_pretrained_model`, or the LoRA loader (base from adapter_config.json or
        `base_model`; merged in memory unless `merge_lora=False`). The vision tower id in the checkpoint's
        config must resolve (HF cache / hub) as for upstream."""
        from llava.model.builder import load_pretrained_model

        from llava_vla_plugin.core.env import default_attn_implementation

        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
        attn = attn_implementation or default_attn_implementation()
        try:
            if lora.is_lora_checkpoint(path):
                tokenizer, model, image_processor = lora.load_lora_checkpoint(
                    path, base=base_model, device=device, torch_dtype=name, attn_implementation=attn, merge=merge_lora)
            else:
                tokenizer, model, image_processor, _ = load_pretrained_model(
                    str(path), None, "llava_qwen", device_map=device, torch_dtype=name, attn_implementation=attn)
        except OSError as e:
            tower = json.loads((path / "config.json").read_text()).get("mm_vision_tower")
            raise OSError(f"loading {path} failed: {e}\n(the vision tower {tower!r} named in its config.json must "
                          "resolve from the Hugging Face cache or hub: check HF_HOME / HF_HUB_OFFLINE)") from e
        action_repr.load_into(model, tokenizer, path)
        model.eval()
        return cls(model, tokenizer, image_processor, last_logits_only=last_logits_only)

    def bind(self, policy) -> None:
        """The generation config for this policy's answer length (greedy, nothing from the checkpoint)."""
        self.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None,
            repetition_penalty=None, no_repeat_ngram_size=None, max_new_tokens=policy.n_action_tokens + 1,
            min_new_tokens=None, eos_token_id=policy.end_id, pad_token_id=policy.pad_id, bos_token_id=None,
            use_cache=True,
        )

    def image_tensor(self, pil, mode: str | None = None) -> torch.Tensor:
        """upstream's process_images under the model's image_aspect_ratio, or `mode` ("pad": each image of a
        multi-view prompt is one tile, as upstream trains multi-image samples; core/inputs.py)."""
        from types import SimpleNamespace

        from llava.mm_utils import process_images

        config = self.model.config if mode is None else SimpleNamespace(image_aspect_ratio=mode)
        processed = process_images([pil], self.image_processor, config)
        return processed[0].to(device=self.model.device, dtype=self.model.dtype)

    def encode(self, pils: list, prompts: list[list[int]], texts: list[str], pad_id: int, n_views: int = 1) -> PreparedInputs:
        """`pils`: the images of every prompt in order, `n_views` per prompt (one placeholder each)."""
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        device = self.model.device
        return PreparedInputs(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            images=[self.image_tensor(p, None if n_views == 1 else "pad") for p in pils], image_sizes=[p.size for p in pils],
            modalities=["image"] * len(pils))

    def generate(self, inputs: PreparedInputs, max_new_tokens: int, new_logits_processor) -> torch.Tensor:
        assert self.generation_config is not None and self.generation_config.max_new_tokens == max_new_tokens
        return self.model.generate(**inputs.generate_kwargs(), generation_config=self.generation_config,
                                   use_model_defaults=False, logits_processor=new_logits_processor())

    def slot_actions(self, inputs: PreparedInputs, n_slots: int) -> np.ndarray:
        """"placeholders" decoding (parallel_l1): prompt + n_slots placeholders (each plus the head's slot
        embedding), the hidden states of the last n_slots positions (left padding puts them last in every
        row) -> the model's ActionHead. No LM head, no generate()."""
        model = head_host(self.model)  # an unmerged LoRA model: the LLaVA model under the PEFT wrapper
        head = model.vla_action_head
        b = inputs.input_ids.shape[0]
        slots = torch.full((b, n_slots), head.slot_token_id, dtype=inputs.input_ids.dtype, device=inputs.input_ids.device)
        input_ids = torch.cat([inputs.input_ids, slots], dim=1)
        attention_mask = torch.cat([inputs.attention_mask, torch.ones_like(slots)], dim=1)
        (_, position_ids, attention_mask, _, embeds, _) = model.prepare_inputs_labels_for_multimodal(
            input_ids, None, attention_mask, None, None, inputs.images, inputs.modalities, inputs.image_sizes)
        embeds[:, -n_slots:] += head.slot_embeddings(b, embeds.dtype).reshape(b, n_slots, -1)
        hidden = model.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, return_dict=True).last_hidden_state
        return head(hidden[:, -n_slots:]).float().cpu().numpy()
