"""The `transformers` backend of the policy pipeline (infer/pipeline.py): an exported
LlavaOnevisionForConditionalGeneration (infer/export_hf.py), with transformers only (no upstream LLaVA-NeXT).

    from llava_vla_plugin.infer.hf_policy import HFVLAPolicy   # or VLAPolicy: an export takes this backend
    policy = HFVLAPolicy.from_pretrained("exported/", device="cuda")
    action = policy.predict_action(image, "put the cup in the sink", unnorm_key="bridge_orig")

The prompt, the decoding constraint and the un-normalization are the pipeline's, so they are the upstream
backend's by construction; this module does the image and the model call. The image follows the mode the
checkpoint was trained with (vla_export.json): `anyres_max_N` through transformers' own processor and
model; `pad`, which transformers' processor has no single-image mode for, through the processor's own
pad_to_square + preprocessing, with the 729 features + image newline fed as input embeddings (exactly
what the model computes for a one-tile image). Token representations (`bins`, `bins_chunk`); the
parallel_l1 head is not part of the transformers model (refused at load, before weights).
A batch runs one generate() per image: the `pad` path feeds embeddings of per-image length, and this
backend is the portable path, not the fast one.
"""
from __future__ import annotations

import torch

from llava_vla_plugin.core.augment import center_crop
from llava_vla_plugin.infer.pipeline import VLAPolicy, to_pil


class HFVLAPolicy(VLAPolicy):
    """The pipeline on the transformers backend, whatever the directory holds."""

    @classmethod
    def from_pretrained(cls, path, device: str | None = None, dtype=None, **options) -> "HFVLAPolicy":
        return super().from_pretrained(path, device=device, dtype=dtype, backend="transformers", **options)

    @property
    def image_aspect_ratio(self) -> str:
        return self.backend.image_aspect_ratio

    def model_inputs(self, image, instruction: str) -> dict:
        """generate()/forward() keyword arguments for one image and instruction (batch 1); the image as prepare()
        gives it to the backend (centre-cropped for a checkpoint trained with --vla_image_aug)."""
        pil = to_pil(image)
        return self.backend.model_inputs(center_crop(pil) if self.center_crop else pil, self.prompt_builder.prompt_text(instruction))

    def pad_pixel_values(self, pil) -> torch.Tensor:
        return self.backend.pad_pixel_values(pil)
