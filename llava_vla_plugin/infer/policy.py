"""VLAPolicy: image + instruction in, robot action out, from a llava_vla_plugin checkpoint.

    from llava_vla_plugin import VLAPolicy
    policy = VLAPolicy.from_pretrained("runs/ov-vla", device="cuda", dtype="bfloat16")
    action = policy.predict_action(image, "put the cup in the sink", unnorm_key="bridge_orig")

What happens (docs/DESIGN.md 2.3-2.6):
  * the checkpoint loads with plain upstream `load_pretrained_model(path, None, "llava_qwen")`;
  * the prompt ids are exactly the training prompt's (VLAPromptBuilder), with the image placeholder;
  * the image goes through upstream's `process_images` with the checkpoint's `image_aspect_ratio`,
    and is handed to the model as a list of per-image tensors, as the training collator does (a
    stacked 4-d tensor would take upstream's other branch and drop the image-newline token);
  * generation is greedy and constrained: the first `action_dim` new tokens may only be action
    tokens, the next only `<|im_end|>`. The generation config is built here and the checkpoint's
    generation_config.json is ignored (`use_model_defaults=False`), so no sampling settings leak in;
  * action tokens are decoded to bin centres and un-normalized with the checkpoint's
    dataset_statistics.json as OpenVLA does (normalization.py).
Batches are left-padded; model access is serialized with a lock, so one policy can serve threads.
Speed: upstream's forward makes generate() compute the LM head over every prompt position; the
policy gives its model instance a forward that computes it at the last position only
(`keep_last_logits_only`, on by default: ~2.4x faster on the tiny CPU model, and 0.5-1.8 GB less
fp32 logits per sample on real ones). `last_logits_only=False` keeps upstream's forward untouched.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from llava_vla_plugin.core import checkpoint as vla_checkpoint
from llava_vla_plugin.train import lora
from llava_vla_plugin.core.representations import ActionReprConfig, ActionRepresentation, make_representation
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.normalization import action_stats, resolve_unnorm_key, unnormalize_actions
from llava_vla_plugin.core.prompt import VLAPromptBuilder

IM_END = "<|im_end|>"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ImageInputError(ValueError):
    """An image that is neither a PIL image nor an HxWx3 uint8 array."""


class ActionConstraint(LogitsProcessor):
    """Only action tokens for the first `action_dim` new tokens, then only `end_id`.

    The step is counted from the length of `input_ids` at the first call, so it works whether
    generate() was given input ids or (as upstream LLaVA does) only embeddings. One instance per
    generate() call.
    """

    def __init__(self, first_action_id: int, n_bins: int, end_id: int, action_dim: int):
        self.first, self.n_bins, self.end_id, self.action_dim = first_action_id, n_bins, end_id, action_dim
        self.start_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start_len is None:
            self.start_len = input_ids.shape[-1]
        step = input_ids.shape[-1] - self.start_len
        out = torch.full_like(scores, float("-inf"))
        if step < self.action_dim:
            out[:, self.first:self.first + self.n_bins] = scores[:, self.first:self.first + self.n_bins]
        else:
            out[:, self.end_id] = scores[:, self.end_id]
        return out


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


def to_pil(image) -> Image.Image:
    """PIL image (any mode, made RGB) or an HxWx3 uint8 array -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
            raise ImageInputError(f"image array must have shape (H, W, 3), got {image.shape}")
        if image.dtype != np.uint8:
            raise ImageInputError(f"image array must be uint8 (0..255), got {image.dtype}")
        return Image.fromarray(np.ascontiguousarray(image), mode="RGB")
    raise ImageInputError(f"image must be a PIL image or an (H, W, 3) uint8 numpy array, got {type(image).__name__}")


def resolve_dtype(dtype, device: str) -> torch.dtype:
    if dtype is None:
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))} or a torch.dtype, got {dtype!r}")
    return _DTYPES[key]


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


def check_device(device) -> None:
    """A CUDA device this process cannot use fails here, before any weight loads, with what to do
    (torch's own answer, deep in the load, is a bare `AssertionError: Torch not compiled with CUDA enabled`)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={str(device)!r} is not a torch device ({e}); use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA" if torch.version.cuda is None
               else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi and CUDA_VISIBLE_DEVICES")
        raise ValueError(f"device={str(device)!r}, but {why}. Pass device='cpu' (slow, float32), or leave device unset "
                         "to use CUDA when present and the CPU otherwise")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r}, but this process sees {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1}; CUDA_VISIBLE_DEVICES renumbers them)")


class VLAPolicy:
    def __init__(self, model, tokenizer, image_processor, action_tokenizer: ActionTokenizer, norm_stats: dict,
                 checkpoint: str | None = None, last_logits_only: bool = True,
                 action_repr: ActionRepresentation | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.action_tokenizer = action_tokenizer
        self.norm_stats = norm_stats
        self.checkpoint = checkpoint
        self.prompt_builder = VLAPromptBuilder(tokenizer, action_tokenizer)
        self.end_id = self.prompt_builder.im_end
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        self.action_dim = action_tokenizer.action_dim
        # How actions are decoded (action_repr.py); a checkpoint without vla_action_repr.json is `bins`, H = 1.
        self.action_repr = action_repr or make_representation(ActionReprConfig(action_dim=self.action_dim, n_bins=action_tokenizer.n_bins), action_tokenizer)
        self.horizon = self.action_repr.horizon
        self.n_action_tokens = getattr(self.action_repr, "n_action_tokens", 0)  # 0: no tokens generated (parallel_l1)
        ids = tokenizer.convert_tokens_to_ids(action_tokenizer.tokens)
        if ids != action_tokenizer.token_ids.tolist():
            raise ValueError("the checkpoint's tokenizer and vla_action_tokenizer.json disagree on the action token ids "
                             f"(tokenizer: {ids[:2]}..., action tokenizer: {action_tokenizer.token_ids[:2].tolist()}...)")
        n_rows = model.get_output_embeddings().weight.shape[0]
        if action_tokenizer.token_ids[-1] >= n_rows:
            raise ValueError(f"the model's LM head has {n_rows} rows, fewer than the action token ids need")
        # Batches are left-padded for generation (upstream pads by this config field).
        model.config.tokenizer_padding_side = "left"
        # an unmerged LoRA model (PEFT wrapper) generates through its base model's forward
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.last_logits_only = keep_last_logits_only(base) if last_logits_only else False
        self.generation_config = GenerationConfig(
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, min_p=None, typical_p=None,
            repetition_penalty=None, no_repeat_ngram_size=None, max_new_tokens=self.n_action_tokens + 1,
            min_new_tokens=None, eos_token_id=self.end_id, pad_token_id=self.pad_id, bos_token_id=None,
            use_cache=True,
        )
        self._lock = threading.Lock()
        self._prompt_lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, device: str | None = None, dtype=None,
                        attn_implementation: str | None = None, last_logits_only: bool = True,
                        base_model: str | None = None, merge_lora: bool = True) -> "VLAPolicy":
        """Load with plain upstream `load_pretrained_model`; device defaults to cuda when present.

        The vision tower id in the checkpoint's config must resolve (HF cache / hub) as for upstream.
        A LoRA checkpoint (adapter_config.json: `--lora_enable True` runs, OUTPUT_DIR or checkpoint-N)
        loads its base model (adapter_config.json's, or `base_model`) plus the adapter, merged in
        memory unless `merge_lora=False` (lora.py); OUTPUT_DIR/merged loads like a full checkpoint.
        """
        from llava.model.builder import load_pretrained_model

        from llava_vla_plugin.core.env import default_attn_implementation

        path = Path(checkpoint)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        ck = vla_checkpoint.read(path)  # the VLA files, as every kind of checkpoint carries them (checkpoint.py)
        action_tokenizer, norm_stats = ck.action_tokenizer, ck.statistics
        action_repr = make_representation(ck.repr_config, action_tokenizer)
        torch_dtype = resolve_dtype(dtype, device)
        name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[torch_dtype]
        attn = attn_implementation or default_attn_implementation()
        try:
            if lora.is_lora_checkpoint(path):
                tokenizer, model, image_processor = lora.load_lora_checkpoint(
                    path, base=base_model, device=str(device), torch_dtype=name, attn_implementation=attn, merge=merge_lora)
            else:
                tokenizer, model, image_processor, _ = load_pretrained_model(
                    str(path), None, "llava_qwen", device_map=str(device), torch_dtype=name, attn_implementation=attn)
        except OSError as e:
            tower = json.loads((path / "config.json").read_text()).get("mm_vision_tower")
            raise OSError(f"loading {path} failed: {e}\n(the vision tower {tower!r} named in its config.json must "
                          "resolve from the Hugging Face cache or hub: check HF_HOME / HF_HUB_OFFLINE)") from e
        action_repr.load_into(model, tokenizer, path)
        model.eval()
        return cls(model, tokenizer, image_processor, action_tokenizer, norm_stats, checkpoint=str(path),
                   last_logits_only=last_logits_only, action_repr=action_repr)

    # ---- inputs --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def dataset_names(self) -> list[str]:
        return sorted(self.norm_stats)

    def image_tensor(self, pil: Image.Image) -> torch.Tensor:
        from llava.mm_utils import process_images

        processed = process_images([pil], self.image_processor, self.model.config)
        return processed[0].to(device=self.device, dtype=self.dtype)

    def prepare(self, images: Sequence, instructions: Sequence[str]) -> PreparedInputs:
        if isinstance(instructions, str):  # one instruction for every image
            instructions = [instructions] * len(images)
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        if not len(images):
            raise ValueError("no images given")
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction must be a non-empty string, got {text!r}")
        pils = [to_pil(im) for im in images]
        with self._prompt_lock:  # a fast tokenizer must not be entered by two threads at once
            prompts = [self.prompt_builder.prompt_ids(text) for text in instructions]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        return PreparedInputs(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            images=[self.image_tensor(p) for p in pils], image_sizes=[p.size for p in pils],
            modalities=["image"] * len(pils))

    def logits_processor(self) -> LogitsProcessorList:
        at = self.action_tokenizer
        return LogitsProcessorList([ActionConstraint(int(at.token_ids[0]), at.n_bins, self.end_id, self.n_action_tokens)])

    # ---- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(self, inputs: PreparedInputs) -> torch.Tensor:
        """Constrained greedy generation; returns the new tokens [B, H * action_dim + 1]."""
        with self._lock:
            out = self.model.generate(**inputs.generate_kwargs(), generation_config=self.generation_config,
                                      use_model_defaults=False, logits_processor=self.logits_processor())
        return out[:, -(self.n_action_tokens + 1):]

    def predict_action_ids(self, images: Sequence, instructions: Sequence[str]) -> np.ndarray:
        """[B, H * action_dim] action token ids (token representations only)."""
        return self.action_ids_from_inputs(self.prepare(images, instructions))

    def action_ids_from_inputs(self, inputs: PreparedInputs) -> np.ndarray:
        n = self.n_action_tokens
        if not n:
            raise RuntimeError(f"the {self.action_repr.name} representation predicts no action tokens: use predict_normalized")
        new = self.generate_ids(inputs).cpu().numpy()
        ids = new[:, :n]
        if new.shape[1] != n + 1 or not self.action_tokenizer.is_action_id(ids).all():
            raise RuntimeError(f"constrained generation returned {new.tolist()}: not {n} action tokens")
        return ids

    def predict_normalized(self, images: Sequence, instructions: Sequence[str] | str) -> np.ndarray:
        """Normalized actions [B, H, action_dim], decoded as the checkpoint's representation says."""
        return self.action_repr.predict_normalized(self, self.prepare(images, instructions))

    def decode_normalized(self, ids) -> np.ndarray:
        return self.action_tokenizer.decode_ids(ids)

    def unnormalize(self, normalized, unnorm_key: str | None = None) -> np.ndarray:
        return unnormalize_actions(normalized, action_stats(self.norm_stats, unnorm_key))

    def predict_actions(self, images: Sequence, instructions: Sequence[str] | str, unnorm_key: str | None = None) -> np.ndarray:
        """Batched form: [B, action_dim] actions in the dataset's units (float64, as OpenVLA returns), or
        [B, H, action_dim] (every step un-normalized) for a chunked checkpoint (H > 1).

        One generate() call (one forward for parallel_l1) for the batch (left-padded); a single string
        applies to every image.
        """
        resolve_unnorm_key(self.norm_stats, unnorm_key)  # a bad key fails before the model runs
        actions = self.unnormalize(self.predict_normalized(images, instructions), unnorm_key)
        return actions if self.horizon > 1 else actions[:, 0]

    def predict_action(self, image, instruction: str, unnorm_key: str | None = None) -> np.ndarray:
        """One image (PIL or HxWx3 uint8) and instruction -> [action_dim] action (float64), or the chunk
        [H, action_dim] for a chunked checkpoint (as OpenVLA-OFT's deploy.py answers)."""
        return self.predict_actions([image], [instruction], unnorm_key)[0]
