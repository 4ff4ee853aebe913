"""The `transformers` backend of the policy pipeline (infer/pipeline.py); the policy is hf_policy.HFVLAPolicy."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llava_vla_plugin.core.representations import ActionRepresentation
from llava_vla_plugin.infer.export_hf import EXPORT_INFO, IMAGE_TOKEN, load_processor


class TransformersBackend:
    kind = "transformers"
    decodings = ("tokens",)  # the representations' `decoding` values this backend runs

    def __init__(self, model, processor, image_aspect_ratio: str):
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.image_aspect_ratio = image_aspect_ratio
        if "anyres" not in image_aspect_ratio and image_aspect_ratio != "pad":
            raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r}: the transformers backend supports pad and anyres modes")

    @staticmethod
    def check_supports(path: Path, action_repr: ActionRepresentation) -> None:
        from llava_vla_plugin.core.inputs import InputConfig

        inputs = InputConfig.load(path)
        if not inputs.is_default:
            raise ValueError(f"{path}: trained with {inputs.describe()}; the transformers backend runs the primary view "
                             "alone: load the training checkpoint (VLAPolicy.from_pretrained(OUTPUT_DIR))")
        if action_repr.decoding not in TransformersBackend.decodings:
            raise ValueError(f"{path}: the transformers backend decodes token representations (bins, bins_chunk); this "
                             f"checkpoint is {action_repr.name!r}, whose head is not part of the transformers model. "
                             "Load the training checkpoint it was exported from (VLAPolicy.from_pretrained(OUTPUT_DIR))")

    @classmethod
    def load(cls, path: Path, action_repr: ActionRepresentation, device: str, dtype: torch.dtype) -> "TransformersBackend":
        from transformers import LlavaOnevisionForConditionalGeneration

        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, torch_dtype=dtype)
        model.to(device).eval()
        info = json.loads((path / EXPORT_INFO).read_text()) if (path / EXPORT_INFO).exists() else {}
        mode = info.get("trained_image_aspect_ratio") or model.config.vision_aspect_ratio
        return cls(model, load_processor(path), mode)

    def bind(self, policy) -> None:
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=policy.n_action_tokens + 1,
                                                  eos_token_id=policy.end_id, pad_token_id=self.tokenizer.pad_token_id,
                                                  use_cache=True)

    def encode(self, pils: list, prompts: list[list[int]], texts: list[str], pad_id: int) -> list[dict]:
        return [self.model_inputs(pil, text) for pil, text in zip(pils, texts)]

    def generate(self, inputs: list[dict], max_new_tokens: int, new_logits_processor) -> torch.Tensor:
        assert self.generation_config.max_new_tokens == max_new_tokens
        outs = []
        for one in inputs:
            kwargs = {k: v for k, v in one.items() if k != "input_ids_for_check"}
            if kwargs.get("inputs_embeds") is None:
                kwargs.pop("inputs_embeds", None)
            # a fresh constraint per generate() call: it counts steps from its first call
            out = self.model.generate(**kwargs, generation_config=self.generation_config,
                                      logits_processor=new_logits_processor())
            outs.append(out[0, -max_new_tokens:])
        return torch.stack(outs)

    def slot_actions(self, inputs, n_slots: int) -> np.ndarray:
        raise ValueError("the transformers backend has no parallel_l1 head (check_supports refuses such checkpoints)")

    def model_inputs(self, pil, text: str) -> dict:
        """generate()/forward() keyword arguments for one image and its prompt text (batch 1)."""
        dtype = self.model.dtype
        if "anyres" in self.image_aspect_ratio:
            inputs = self.processor(images=pil, text=text, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            return {k: v.to(self.model.device) for k, v in inputs.items()}
        return {"inputs_embeds": None, **self._pad_inputs(pil, text)}

    def pad_pixel_values(self, pil) -> torch.Tensor:
        """Upstream's `pad`: square with the mean colour, resize to the tower size; with transformers' own code."""
        from transformers.image_utils import ChannelDimension

        ip = self.processor.image_processor
        arr = np.asarray(pil)
        square = ip.pad_to_square(arr, background_color=tuple(int(x * 255) for x in ip.image_mean),
                                  input_data_format=ChannelDimension.LAST)
        size = (ip.size["height"], ip.size["width"])
        pv = ip._preprocess([square], do_resize=True, size=size, resample=ip.resample, do_rescale=True,
                            rescale_factor=ip.rescale_factor, do_normalize=True, image_mean=ip.image_mean,
                            image_std=ip.image_std, data_format=ChannelDimension.FIRST,
                            input_data_format=ChannelDimension.LAST)
        return torch.from_numpy(np.asarray(pv)).to(self.model.device, self.model.dtype)

    def _pad_inputs(self, pil, text: str) -> dict:
        m = self.model.model
        feats = m.vision_tower(self.pad_pixel_values(pil), output_hidden_states=True).hidden_states[-1]
        feats = m.multi_modal_projector(feats)[0]
        feats = torch.cat((feats, m.image_newline[None].to(feats)), dim=0)  # one tile: 729 + newline
        ids = self.tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * feats.shape[0]), return_tensors="pt",
                             add_special_tokens=False)["input_ids"].to(self.model.device)
        embeds = m.get_input_embeddings()(ids)
        mask = (ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": torch.ones_like(ids), "input_ids_for_check": ids}
