"""One policy pipeline: input transforms, then a model backend, then output transforms (openpi's `Policy`).

    from llava_vla_plugin import VLAPolicy
    policy = VLAPolicy.from_pretrained("runs/ov-vla")           # any checkpoint kind, or a transformers export
    action = policy.predict_action(image, "put the cup in the sink", unnorm_key="bridge_orig")

    images, instructions                     input transforms (here): check, RGB PIL (OFT's centre crop when the
                                             checkpoint trained with --vla_image_aug), the training prompt
      -> backend.encode                      the backend's image processing and model inputs
      -> the checkpoint's representation     how normalized actions come out of the model (core/representations):
           token representations: backend.generate under ActionConstraint, then representation.extract
           parallel_l1:           backend.slot_actions (one forward, the regression head)
      -> output transforms (here)            un-normalize with the checkpoint's statistics and the one key rule
                                             (core/normalization.resolve_unnorm_key); H = 1 gives [D]

Two backends, chosen by what the directory holds (BACKENDS, data):
  * `upstream` (infer/upstream_backend.py): upstream LLaVA-NeXT's model and image code; every training checkpoint
    kind (full, LoRA unmerged/merged, checkpoint-N, ZeRO-3), every representation;
  * `transformers` (infer/transformers_backend.py): an export (`vla_export.json`, infer/export_hf.py) through
    transformers' LlavaOnevision classes only; token representations (`bins`, `bins_chunk`).
Why one pipeline: the two policies used to repeat the prompt, the decoding constraint and the
un-normalization, and their rules drifted (HFVLAPolicy decoded `bins` H = 1 only). Everything but the
model call now happens once, here; /act (serve.py), the vla-eval server and offline eval (eval.py) load
through `VLAPolicy.from_pretrained` and so serve either backend.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from llava_vla_plugin.core import checkpoint as vla_checkpoint
from llava_vla_plugin.core.augment import center_crop
from llava_vla_plugin.core.inputs import MissingInputError, discretize_state, proprio_statistics, state_text
from llava_vla_plugin.core.normalization import action_stats, resolve_unnorm_key, unnormalize_actions
from llava_vla_plugin.core.prompt import VLAPromptBuilder
from llava_vla_plugin.core.representations import ActionReprConfig, ActionRepresentation, make_representation
from llava_vla_plugin.infer.restricted_head import restricted_lm_head
from llava_vla_plugin.infer.transformers_backend import TransformersBackend
from llava_vla_plugin.infer.upstream_backend import UpstreamBackend

IM_END = "<|im_end|>"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ImageInputError(ValueError):
    """An image that is neither a PIL image nor an HxWx3 uint8 array."""


class ActionConstraint(LogitsProcessor):
    """The representation's TokenPlan as a logits processor: ids first..first+n_bins-1 for the first `action_dim`
    new tokens, then only `end_id`. exact=True (bins): exactly `action_dim` of them; exact=False (fast): from the
    second step on the end may come instead (variable-length answers), and after `action_dim` only the end.

    The step is counted from the length of `input_ids` at the first call, so it works whether
    generate() was given input ids or (as upstream LLaVA does) only embeddings. One instance per
    generate() call.
    """

    def __init__(self, first_action_id: int, n_bins: int, end_id: int, action_dim: int, exact: bool = True):
        self.first, self.n_bins, self.end_id, self.action_dim = first_action_id, n_bins, end_id, action_dim
        self.exact = exact
        self.start_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start_len is None:
            self.start_len = input_ids.shape[-1]
        step = input_ids.shape[-1] - self.start_len
        out = torch.full_like(scores, float("-inf"))
        if step < self.action_dim:
            out[:, self.first:self.first + self.n_bins] = scores[:, self.first:self.first + self.n_bins]
            if not self.exact and step > 0:
                out[:, self.end_id] = scores[:, self.end_id]
        else:
            out[:, self.end_id] = scores[:, self.end_id]
        return out


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


def backend_kind(path: str | os.PathLike) -> str:
    """`transformers` for an export (it carries vla_export.json), else `upstream`."""
    return "transformers" if vla_checkpoint.is_transformers_export(path) else "upstream"


# The backends, as data: what runs the model for a checkpoint kind (module docstring).
BACKENDS = {"upstream": UpstreamBackend, "transformers": TransformersBackend}


class VLAPolicy:
    """Image(s) + instruction(s) in, actions out, for every checkpoint kind and representation.

    `backend` runs the model (encode, generate, slot_actions); everything else is here, once.
    Model access is serialized with a lock, so one policy can serve threads.
    """

    def __init__(self, backend, files: vla_checkpoint.VLACheckpoint, checkpoint: str | None = None,
                 action_repr: ActionRepresentation | None = None, restrict_head: bool = True):
        self.backend = backend
        # decode steps compute only the LM head rows the constraint allows (infer/restricted_head.py); False: the
        # full head, as before (benchmarks compare the two). `head_restricted`: whether the last generate() did.
        self.restrict_head = restrict_head
        self.head_restricted = False
        self.files = files
        self.checkpoint = checkpoint
        self.action_tokenizer = files.action_tokenizer
        self.norm_stats = files.statistics
        # A checkpoint trained with OpenVLA's random crop (area 0.9) sees a centre crop of the same area, as OFT
        # evaluates such models (openvla-oft experiments/robot/openvla_utils.py:707-708); others see the image
        # as given. Settable, like OFT's --center_crop.
        self.center_crop = files.image_aug
        self.action_repr = action_repr or make_representation(files.repr_config, files.action_tokenizer,
                                                               directory=files.path)
        self.horizon = self.action_repr.horizon
        self.action_dim = self.action_tokenizer.action_dim
        tokenizer = backend.tokenizer
        # what generation may pick (the representation's TokenPlan); None: no tokens generated (parallel_l1)
        self.token_plan = self.action_repr.token_plan(tokenizer) if self.action_repr.decoding == "tokens" else None
        self.n_action_tokens = self.token_plan.max_tokens if self.token_plan is not None else 0
        self.decode_failures = 0  # invalid generated sequences (fast), answered with the representation's fallback
        # the views and the state the checkpoint was trained on (vla_inputs.json; core/inputs.py)
        self.inputs = files.inputs
        self.prompt_builder = VLAPromptBuilder(tokenizer, self.action_tokenizer, n_views=self.inputs.n_views)
        self.end_id = self.prompt_builder.im_end
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        ids = tokenizer.convert_tokens_to_ids(self.action_tokenizer.tokens)
        if ids != self.action_tokenizer.token_ids.tolist():
            raise ValueError(f"{checkpoint}: its tokenizer and vla_action_tokenizer.json disagree on the action token ids "
                             f"(tokenizer: {ids[:2]}..., action tokenizer: {self.action_tokenizer.token_ids[:2].tolist()}...)")
        n_rows = backend.model.get_output_embeddings().weight.shape[0]
        if self.action_tokenizer.token_ids[-1] >= n_rows:
            raise ValueError(f"{checkpoint}: the model's LM head has {n_rows} rows, fewer than the action token ids need")
        backend.bind(self)
        self._lock = threading.Lock()
        self._prompt_lock = threading.Lock()

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike, device: str | None = None, dtype=None,
                        backend: str = "auto", restrict_head: bool = True, **options) -> "VLAPolicy":
        """Load a checkpoint directory; device defaults to cuda when present.

        backend="auto" takes `transformers` for an export and `upstream` otherwise; `options` go to the
        backend's loader (upstream: attn_implementation, last_logits_only, base_model, merge_lora).
        `restrict_head=False` decodes with the full LM head (infer/restricted_head.py; same actions, slower).
        A LoRA checkpoint (adapter_config.json: OUTPUT_DIR or checkpoint-N of a `--lora_enable True` run)
        loads its base model plus the adapter, merged in memory unless `merge_lora=False` (train/lora.py);
        OUTPUT_DIR/merged loads like a full checkpoint.
        """
        path = Path(checkpoint)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
        kind = backend_kind(path) if backend == "auto" else backend
        registry = BACKENDS
        if kind not in registry:
            raise ValueError(f"backend must be one of auto, {', '.join(registry)}; got {backend!r}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        files = vla_checkpoint.read(path)  # the VLA files, as every kind of checkpoint carries them
        action_repr = make_representation(files.repr_config, files.action_tokenizer, directory=path)
        impl = registry[kind]
        impl.check_supports(path, action_repr)  # before any weight loads
        loaded = impl.load(path, action_repr, device=str(device), dtype=resolve_dtype(dtype, device), **options)
        return cls(loaded, files, checkpoint=str(path), action_repr=action_repr, restrict_head=restrict_head)

    @classmethod
    def from_upstream_model(cls, model, tokenizer, image_processor, action_tokenizer, statistics: dict,
                            action_repr: ActionRepresentation | None = None, last_logits_only: bool = True,
                            checkpoint: str | None = None, restrict_head: bool = True) -> "VLAPolicy":
        """A policy over an upstream model already in memory (benchmarks, tests: no checkpoint directory)."""
        action_repr = action_repr or make_representation(
            ActionReprConfig(action_dim=action_tokenizer.action_dim, n_bins=action_tokenizer.n_bins), action_tokenizer)
        files = vla_checkpoint.VLACheckpoint(Path(checkpoint or "."), action_tokenizer, action_repr.config, statistics)
        backend = UpstreamBackend(model, tokenizer, image_processor, last_logits_only=last_logits_only)
        return cls(backend, files, checkpoint=checkpoint, action_repr=action_repr, restrict_head=restrict_head)

    # ---- what callers read ----------------------------------------------------------------------
    @property
    def model(self):
        return self.backend.model

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def device(self) -> torch.device:
        return self.backend.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.model.dtype

    @property
    def dataset_names(self) -> list[str]:
        return sorted(self.norm_stats)

    # ---- input transforms ----------------------------------------------------------------------
    def _one_per_image(self, values, n_images: int, trained_with: str, pass_what: str, plural: str) -> None:
        """An input the checkpoint was trained with (vla_inputs.json): refused when absent (MissingInputError,
        naming it) or when there is not one per image."""
        if values is None:
            raise MissingInputError(f"{self.checkpoint}: this policy was trained with the {trained_with} "
                                    f"({self.inputs.describe()}, vla_inputs.json): pass the {pass_what} too")
        if len(values) != n_images:
            raise ValueError(f"{n_images} images but {len(values)} {plural}")

    def prepare(self, images: Sequence, instructions: Sequence[str] | str, wrist_images: Sequence | None = None,
                states: Sequence | None = None, unnorm_key: str | None = None):
        """Checked RGB images and the training prompt -> the backend's model inputs (batched, left-padded).

        A checkpoint trained with the wrist view or the state (self.inputs) needs `wrist_images` / `states` (raw
        robot state, normalized with the `unnorm_key` dataset's proprio statistics): a request without them is refused
        (MissingInputError, naming what is missing); given to a checkpoint that does not use them, they are ignored."""
        if isinstance(instructions, str):  # one instruction for every image
            instructions = [instructions] * len(images)
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        if not len(images):
            raise ValueError("no images given")
        for text in instructions:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"instruction must be a non-empty string, got {text!r}")
        views = [[to_pil(im)] for im in images]
        if self.inputs.wrist:
            self._one_per_image(wrist_images, len(images), "wrist camera", "wrist image", "wrist images")
            for v, im in zip(views, wrist_images):
                v.append(to_pil(im))
        if self.center_crop:
            views = [[center_crop(im) for im in v] for v in views]
        builders = [self.prompt_builder] * len(images)
        if self.inputs.proprio:
            self._one_per_image(states, len(images), "robot state", "state (proprio)", "states")
            key = resolve_unnorm_key(self.norm_stats, unnorm_key)
            entry = proprio_statistics(self.norm_stats, key, str(self.checkpoint))
            builders = [self.prompt_builder.with_state(state_text(discretize_state(st, entry))) for st in states]
        with self._prompt_lock:  # a fast tokenizer must not be entered by two threads at once
            prompt_ids = [b.prompt_ids(text) for b, text in zip(builders, instructions)]
        texts = [b.prompt_text(text) for b, text in zip(builders, instructions)]  # the same prompt, as text
        if self.inputs.n_views == 1:
            return self.backend.encode([v[0] for v in views], prompt_ids, texts, self.pad_id)
        return self.backend.encode([im for v in views for im in v], prompt_ids, texts, self.pad_id, n_views=self.inputs.n_views)

    # ---- the model -----------------------------------------------------------------------------
    def logits_processor(self) -> LogitsProcessorList:
        plan = self.token_plan
        return LogitsProcessorList([ActionConstraint(plan.first_id, plan.n_ids, self.end_id, plan.max_tokens, plan.exact)])

    def allowed_ids(self) -> list[int]:
        """Every id the constraint can let through: the plan's ids and the end token."""
        plan = self.token_plan
        return [*range(plan.first_id, plan.first_id + plan.n_ids), self.end_id]

    def generate_ids(self, inputs) -> torch.Tensor:
        """Constrained greedy generation; the new tokens [B, H * action_dim + 1]. The LM head computes only the
        allowed rows unless `restrict_head` is False (infer/restricted_head.py: the same ids)."""
        with self._lock, torch.inference_mode():
            if self.restrict_head:
                with restricted_lm_head(self.backend.model, self.allowed_ids()) as self.head_restricted:
                    out = self.backend.generate(inputs, self.n_action_tokens + 1, self.logits_processor)
            else:
                self.head_restricted = False
                out = self.backend.generate(inputs, self.n_action_tokens + 1, self.logits_processor)
        return out[:, -(self.n_action_tokens + 1):]

    def action_ids_from_inputs(self, inputs) -> np.ndarray:
        n = self.n_action_tokens
        if not n:
            raise RuntimeError(f"the {self.action_repr.name} representation predicts no action tokens: use predict_normalized")
        new = self.generate_ids(inputs).cpu().numpy()
        if not self.token_plan.exact:  # variable length (fast): the ids as generated, the end and padding included
            return new
        ids = new[:, :n]
        if new.shape[1] != n + 1 or not self.action_tokenizer.is_action_id(ids).all():
            raise RuntimeError(f"constrained generation returned {new.tolist()}: not {n} action tokens")
        return ids

    def predict_action_ids(self, images: Sequence, instructions: Sequence[str] | str, **inputs) -> np.ndarray:
        """[B, H * action_dim] action token ids (token representations only; fast: [B, max tokens + 1] as generated).
        `inputs`: wrist_images, states, unnorm_key, as `prepare` takes them."""
        return self.action_ids_from_inputs(self.prepare(images, instructions, **inputs))

    def slot_actions(self, inputs, n_slots: int) -> np.ndarray:
        """[B, H, D] from one forward with `n_slots` placeholders and the regression head (parallel_l1)."""
        with self._lock, torch.inference_mode():
            return self.backend.slot_actions(inputs, n_slots)

    def predict_normalized(self, images: Sequence, instructions: Sequence[str] | str, **inputs) -> np.ndarray:
        """Normalized actions [B, H, action_dim], decoded as the checkpoint's representation says. `inputs`:
        wrist_images, states, unnorm_key, as `prepare` takes them."""
        return self.action_repr.predict_normalized(self, self.prepare(images, instructions, **inputs))

    # ---- output transforms ---------------------------------------------------------------------
    def decode_normalized(self, ids) -> np.ndarray:
        return self.action_tokenizer.decode_ids(ids)

    def unnormalize(self, normalized, unnorm_key: str | None = None) -> np.ndarray:
        return unnormalize_actions(normalized, action_stats(self.norm_stats, unnorm_key))

    def predict_actions(self, images: Sequence, instructions: Sequence[str] | str, unnorm_key: str | None = None,
                        wrist_images: Sequence | None = None, states: Sequence | None = None) -> np.ndarray:
        """Batched form: [B, action_dim] actions in the dataset's units (float64, as OpenVLA returns), or
        [B, H, action_dim] (every step un-normalized) for a chunked checkpoint (H > 1).

        One generate() call (one forward for parallel_l1) for the batch (left-padded); a single string
        applies to every image. A checkpoint trained with the wrist view or the state needs them (`prepare`).
        """
        resolve_unnorm_key(self.norm_stats, unnorm_key)  # a bad key fails before the model runs
        normalized = self.predict_normalized(images, instructions, wrist_images=wrist_images, states=states,
                                             unnorm_key=unnorm_key)
        actions = self.unnormalize(normalized, unnorm_key)
        return actions if self.horizon > 1 else actions[:, 0]

    def predict_action(self, image, instruction: str, unnorm_key: str | None = None, wrist_image=None,
                       proprio=None) -> np.ndarray:
        """One image (PIL or HxWx3 uint8) and instruction -> [action_dim] action (float64), or the chunk
        [H, action_dim] for a chunked checkpoint (as OpenVLA-OFT's deploy.py answers). `wrist_image` and `proprio`
        (the raw robot state): for a checkpoint trained with them (`self.inputs`)."""
        return self.predict_actions([image], [instruction], unnorm_key,
                                    wrist_images=None if wrist_image is None else [wrist_image],
                                    states=None if proprio is None else [proprio])[0]
