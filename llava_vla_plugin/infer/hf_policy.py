"""A VLA policy over an exported transformers LlavaOnevisionForConditionalGeneration (export_hf.py).

    from llava_vla_plugin.infer.hf_policy import HFVLAPolicy
    policy = HFVLAPolicy.from_pretrained("exported/", device="cuda")
    action = policy.predict_action(image, "put the cup in the sink", unnorm_key="bridge_orig")

Needs transformers only (no upstream LLaVA-NeXT): the same prompt as training (VLAPromptBuilder's
text, `<image>` expanded by the processor), the same constrained greedy decoding as VLAPolicy
(ActionConstraint) and the same un-normalization. The image follows the mode the checkpoint was
trained with (vla_export.json): `anyres_max_N` through transformers' own processor and model;
`pad`, which transformers' processor has no single-image mode for, through the processor's own
pad_to_square + preprocessing, with the 729 features + image newline fed as input embeddings
(exactly what the model computes for a one-tile image). Why a separate class from VLAPolicy:
that one drives upstream's model and image code, this one transformers'.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import torch

from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.infer.export_hf import EXPORT_INFO, IMAGE_TOKEN, load_processor
from llava_vla_plugin.core.normalization import action_stats, resolve_unnorm_key, unnormalize_actions
from llava_vla_plugin.infer.policy import ActionConstraint, resolve_dtype, to_pil
from llava_vla_plugin.core.prompt import VLAPromptBuilder


class HFVLAPolicy:
    def __init__(self, model, processor, action_tokenizer: ActionTokenizer, norm_stats: dict, image_aspect_ratio: str):
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.action_tokenizer, self.norm_stats = action_tokenizer, norm_stats
        self.image_aspect_ratio = image_aspect_ratio
        self.prompt_builder = VLAPromptBuilder(self.tokenizer, action_tokenizer)
        self.action_dim = action_tokenizer.action_dim
        self.end_id = self.prompt_builder.im_end
        if self.tokenizer.convert_tokens_to_ids(action_tokenizer.tokens) != action_tokenizer.token_ids.tolist():
            raise ValueError("the exported tokenizer and vla_action_tokenizer.json disagree on the action token ids")
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path, device: str | None = None, dtype=None) -> "HFVLAPolicy":
        from transformers import LlavaOnevisionForConditionalGeneration

        from llava_vla_plugin.core import checkpoint
        path = Path(path)
        ck = checkpoint.read(path)  # the VLA files the export carried (checkpoint.py owns them)
        repr_config = ck.repr_config
        if repr_config.name != "bins" or repr_config.horizon != 1:
            # chunked tokens and the regression head decode differently; only single-step bins are done here
            raise ValueError(f"{path}: HFVLAPolicy decodes single-step `bins` checkpoints only; this one is "
                             f"{repr_config.name!r} with horizon {repr_config.horizon} (use VLAPolicy on the "
                             "original checkpoint, or apply vla_extra_heads.safetensors yourself)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, torch_dtype=resolve_dtype(dtype, device))
        model.to(device).eval()
        info = json.loads((path / EXPORT_INFO).read_text()) if (path / EXPORT_INFO).exists() else {}
        mode = info.get("trained_image_aspect_ratio") or model.config.vision_aspect_ratio
        return cls(model, load_processor(path), ck.action_tokenizer, ck.statistics, mode)

    @property
    def device(self):
        return self.model.device

    def prompt_text(self, instruction: str) -> str:
        return self.prompt_builder.prompt_text(instruction)

    def model_inputs(self, image, instruction: str) -> dict:
        """generate()/forward() keyword arguments for one image and instruction (batch 1)."""
        pil = to_pil(image)
        text = self.prompt_text(instruction)
        dtype = self.model.dtype
        if "anyres" in self.image_aspect_ratio:
            inputs = self.processor(images=pil, text=text, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            return {k: v.to(self.device) for k, v in inputs.items()}
        if self.image_aspect_ratio != "pad":
            raise ValueError(f"image_aspect_ratio {self.image_aspect_ratio!r}: HFVLAPolicy supports pad and anyres modes")
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
        return torch.from_numpy(np.asarray(pv)).to(self.device, self.model.dtype)

    def _pad_inputs(self, pil, text: str) -> dict:
        m = self.model.model
        feats = m.vision_tower(self.pad_pixel_values(pil), output_hidden_states=True).hidden_states[-1]
        feats = m.multi_modal_projector(feats)[0]
        feats = torch.cat((feats, m.image_newline[None].to(feats)), dim=0)  # one tile: 729 + newline
        ids = self.tokenizer(text.replace(IMAGE_TOKEN, IMAGE_TOKEN * feats.shape[0]), return_tensors="pt",
                             add_special_tokens=False)["input_ids"].to(self.device)
        embeds = m.get_input_embeddings()(ids)
        mask = (ids == self.model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, feats.to(embeds.dtype))
        return {"inputs_embeds": embeds, "attention_mask": torch.ones_like(ids), "input_ids_for_check": ids}

    @torch.inference_mode()
    def predict_action_ids(self, image, instruction: str) -> np.ndarray:
        from transformers import GenerationConfig, LogitsProcessorList

        inputs = self.model_inputs(image, instruction)
        inputs.pop("input_ids_for_check", None)
        if inputs.get("inputs_embeds") is None:
            inputs.pop("inputs_embeds", None)
        at = self.action_tokenizer
        constraint = ActionConstraint(int(at.token_ids[0]), at.n_bins, self.end_id, self.action_dim)
        gen = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=self.action_dim + 1, eos_token_id=self.end_id,
                               pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        with self._lock:
            out = self.model.generate(**inputs, generation_config=gen, logits_processor=LogitsProcessorList([constraint]))
        ids = out[0, -(self.action_dim + 1):].cpu().numpy()[: self.action_dim]
        if not at.is_action_id(ids).all():
            raise RuntimeError(f"constrained generation returned {out[0, -(self.action_dim + 1):].tolist()}")
        return ids

    def predict_action(self, image, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        resolve_unnorm_key(self.norm_stats, unnorm_key)
        normalized = self.action_tokenizer.decode_ids(self.predict_action_ids(image, instruction))
        return unnormalize_actions(normalized, action_stats(self.norm_stats, unnorm_key))
