"""Export a llava_vla_plugin checkpoint to transformers' native LlavaOnevisionForConditionalGeneration.

    python -m llava_vla_plugin.infer.export_hf CKPT OUT [--image-aspect-ratio anyres_max_9]

OUT then loads with transformers alone (no upstream LLaVA-NeXT, no plugin needed to run the model):

    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(OUT)
    processor = AutoProcessor.from_pretrained(OUT)      # needs torchvision (for the video processor);
    # without it: llava_vla_plugin.infer.export_hf.load_processor(OUT) assembles the same processor

and `llava_vla_plugin.infer.hf_policy.HFVLAPolicy.from_pretrained(OUT)` turns it into a policy (prompt,
constrained decoding, un-normalization) giving the same actions as VLAPolicy on the source checkpoint.

Why our own mapping: transformers' convert_llava_onevision_weights_to_hf.py downloads the weights and
the Qwen2 config from the hub and accepts only lmms-lab model ids; a fine-tuned VLA checkpoint is a
local folder with 256 extra tokens. The key mapping below is the same as that script's
KEYS_TO_MODIFY_MAPPING, written for transformers 4.57's module layout (model.language_model, ...):

    model.embed_tokens|layers|norm.*            -> model.language_model.*
    model.vision_tower.vision_tower.vision_model.* -> model.vision_tower.vision_model.*
    model.mm_projector.0|2.*                    -> model.multi_modal_projector.linear_1|linear_2.*
    model.image_newline                         -> model.image_newline
    lm_head.weight                              -> lm_head.weight (absent when tied)

The tower keeps the 26 layers upstream saved (it drops SigLIP's last layer on load, i.e.
mm_vision_select_layer -2), so vision_feature_layer is -1, as transformers' converter writes it.
`<image>` and `<video>` are added after the action tokens (they still fit Qwen2's spare rows, so
no embedding grows); their rows are never read: the model replaces those positions with features.

Files written beside the model and processor: vla_action_tokenizer.json and dataset_statistics.json
(copied unchanged) and vla_export.json (what was exported from where, the aspect-ratio mode the
checkpoint was trained with, and any extra heads). Parameters outside the LLaVA layout (a regression
head for action chunks, say) are not part of LlavaOnevisionForConditionalGeneration: they are written
unchanged to vla_extra_heads.safetensors, and vla_export.json names them; a transformers user loads
that file with safetensors.torch.load_file and applies the head to the LM's last hidden state.

Aspect-ratio modes: transformers' processor reproduces `anyres_max_N` (and `anyres`) for single
images, bit-for-bit in pixel values (tests/test_export_hf.py). It has no single-image `pad` mode (it
pads to square only for multi-image inputs): for a `pad` checkpoint HFVLAPolicy builds the padded
pixel values with the processor's own pad_to_square and preprocessing and 730 image tokens, which
the model accepts (one tile -> 729 features + the newline, as upstream).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava_vla_plugin.core import checkpoint
from llava_vla_plugin.core.representations import HEAD_FILE
from llava_vla_plugin.core.action_tokenizer import CONFIG_NAME as ACTION_CONFIG
from llava_vla_plugin.core.normalization import STATS_NAME

EXPORT_INFO = checkpoint.EXPORT_INFO_FILE
EXTRA_HEADS = "vla_extra_heads.safetensors"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SIGLIP_PATCHES = 729  # 27 x 27 at 384 px, patch 14
# Prefixes of the LLaVA layout: (upstream prefix, transformers prefix), first match wins.
KEY_MAP = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
LLAVA_PREFIXES = ("model.", "lm_head.")
DROPPED_SUFFIXES = (".rotary_emb.inv_freq",)  # buffers some older saves contain; recomputed on load
# SigLIP so400m-384's values: the tower's config, when its hub id does not resolve from the cache.
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "image_size": 384,
                 "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}


class ExportError(ValueError):
    """The checkpoint cannot be exported as it is; the message says what to fix."""


def map_key(key: str) -> str | None:
    """Upstream key -> transformers key; None for keys outside the LLaVA layout (extra heads)."""
    if key.endswith(DROPPED_SUFFIXES):
        return ""
    for old, new in KEY_MAP:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith(LLAVA_PREFIXES):
        raise ExportError(f"parameter {key!r} is in the LLaVA layout but has no transformers counterpart: "
                          "the checkpoint was not written by upstream llava_qwen at df17966 (or this mapping is out of date)")
    return None


def load_state_dict(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{ckpt} has no *.safetensors weights (a checkpoint saved with safe_serialization=False, "
                          "or a DeepSpeed-only folder: run zero_to_fp32.py / save with the trainer first)")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def convert_state_dict(state: dict) -> tuple[dict, dict]:
    """-> (transformers state dict, extra-head tensors under their original names)."""
    out, extra = {}, {}
    for key, value in state.items():
        new = map_key(key)
        if new is None:
            extra[key] = value
        elif new:
            out[new] = value
    return out, extra


def vision_config(upstream_cfg: dict, state: dict, tower_id: str | None):
    """SigLIP config of the exported tower: the published tower's own config when it resolves from the
    HF cache, else so400m-384's values (checked against the weight shapes); layers = those saved."""
    from transformers import SiglipVisionConfig

    prefix = "model.vision_tower.vision_tower.vision_model."
    layers = {int(k[len(prefix):].split(".")[2]) for k in state if k.startswith(prefix + "encoder.layers.")}
    if not layers:
        raise ExportError("the checkpoint holds no vision-tower weights (mm_tunable_parts without mm_vision_tower "
                          "saves none): export needs a checkpoint whose tower was saved with it")
    values, source = dict(SIGLIP_SO400M), "siglip-so400m-patch14-384 values"
    if tower_id:
        try:
            values.update({k: v for k, v in SiglipVisionConfig.from_pretrained(tower_id).to_dict().items()
                           if k in SIGLIP_SO400M})
            source = f"{tower_id} (HF cache)"
        except (OSError, ValueError):
            pass
    hidden = state[prefix + "embeddings.patch_embedding.weight"].shape[0]
    inter = state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    if (hidden, inter) != (values["hidden_size"], values["intermediate_size"]):
        raise ExportError(f"tower weights have hidden {hidden}, intermediate {inter}, but {source} says "
                          f"{values['hidden_size']}, {values['intermediate_size']}: make the tower id in config.json resolve "
                          "(HF_HOME) so its config can be read")
    return SiglipVisionConfig(**values, num_hidden_layers=max(layers) + 1, vision_use_head=False), source


def _video_processor(image_processor):
    """LlavaOnevisionProcessor requires a video processor; transformers' needs torchvision, which this
    environment does not have (VLA frames are single images). Without it, a BaseVideoProcessor with the
    image settings stands in; the saved config names LlavaOnevisionVideoProcessor either way."""
    from transformers.utils import is_torchvision_available

    settings = {k: getattr(image_processor, k) for k in ("size", "image_mean", "image_std", "resample",
                                                         "rescale_factor", "do_convert_rgb")}
    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionVideoProcessor(**settings)
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor(**settings)


def _processor_class():
    """LlavaOnevisionProcessor, or without torchvision the same class accepting the video stand-in
    (its constructor checks the video processor's class by name)."""
    from transformers import LlavaOnevisionProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":  # transformers' class is a torchvision placeholder here
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return LlavaOnevisionImageOnlyProcessor


def load_processor(path: str | Path):
    """AutoProcessor.from_pretrained(path); where torchvision is missing, the same processor assembled
    from the saved tokenizer, image processor and processor_config.json (video stand-in as on export)."""
    from transformers import (AutoProcessor, AutoTokenizer, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor)
    from transformers.utils import is_torchvision_available

    path = Path(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    kwargs = json.loads((path / "processor_config.json").read_text()) if (path / "processor_config.json").exists() else {}
    kwargs = {k: v for k, v in kwargs.items() if k in ("num_image_tokens", "vision_feature_select_strategy",
                                                       "vision_aspect_ratio", "image_token", "video_token")}
    image_processor = LlavaOnevisionImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=_video_processor(image_processor),
                                   chat_template=tokenizer.chat_template, **kwargs)


def export(ckpt: str | Path, out: str | Path, image_aspect_ratio: str | None = None, overwrite: bool = False) -> dict:
    import torch
    from transformers import (AddedToken, AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, Qwen2Config)

    ckpt, out = Path(ckpt), Path(out)
    for name in checkpoint.missing_files(ckpt):
        raise ExportError(f"{ckpt / name} is missing: export needs a llava_vla_plugin checkpoint "
                          "(config.json, weights, tokenizer, vla_action_tokenizer.json, dataset_statistics.json)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} exists and is not empty: choose a new folder or pass --overwrite")
    files = checkpoint.read(ckpt)
    repr_name = files.repr_config.name
    if not files.inputs.is_default:  # not built yet: the transformers model would get one image and no state
        raise ExportError(f"{ckpt} was trained with {files.inputs.describe()} (vla_inputs.json): the export carries the "
                          "primary view alone so far; serve it with the upstream backend (VLAPolicy.from_pretrained, "
                          "serve, vla_eval_server)")
    if repr_name == "fast":  # not built yet: say so before anything loads
        raise ExportError(f"{ckpt} is a `fast` checkpoint: its <FAST_i> tokens usually sit past the embedding's spare "
                          "rows, where <image>/<video> would need rows too, and the export does not resize yet; "
                          "serve it with the upstream backend (VLAPolicy.from_pretrained, serve, vla_eval_server)")
    cfg = json.loads((ckpt / "config.json").read_text())
    trained_mode = cfg.get("image_aspect_ratio", "pad")
    mode = image_aspect_ratio or (trained_mode if "anyres" in str(trained_mode) else "anyres_max_9")
    if not (mode == "anyres" or mode.startswith("anyres_max_")):
        raise ExportError(f"image aspect-ratio mode {mode!r}: transformers' LlavaOnevision supports anyres / anyres_max_N")
    pinpoints = cfg.get("image_grid_pinpoints") or [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    if cfg.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad" or cfg.get("mm_projector_type") != "mlp2x_gelu":
        raise ExportError(f"{ckpt}: mm_patch_merge_type={cfg.get('mm_patch_merge_type')!r}, "
                          f"mm_projector_type={cfg.get('mm_projector_type')!r}; LlavaOnevision needs spatial_unpad + mlp2x_gelu")

    state = load_state_dict(ckpt)
    dtype = next(iter(state.values())).dtype
    new_state, extra = convert_state_dict(state)
    vcfg, vsource = vision_config(cfg, state, cfg.get("mm_vision_tower"))
    del state

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False),
                          AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id, video_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    qwen_keys = set(Qwen2Config().to_dict())
    text_cfg = Qwen2Config(**{k: v for k, v in cfg.items() if k in qwen_keys and k not in ("architectures", "model_type")})
    rows = new_state["model.language_model.embed_tokens.weight"].shape[0]
    if video_id >= rows:
        raise ExportError(f"the tokenizer needs {video_id + 1} rows for <image>/<video>, the embeddings have {rows}")
    config = LlavaOnevisionConfig(
        text_config=text_cfg.to_dict(), vision_config=vcfg.to_dict(), image_token_index=image_id,
        video_token_index=video_id, vision_feature_select_strategy="full", vision_feature_layer=-1,
        vision_aspect_ratio=mode, image_grid_pinpoints=pinpoints, use_image_newline_parameter=True,
        tie_word_embeddings=text_cfg.tie_word_embeddings)
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    if text_cfg.tie_word_embeddings:
        new_state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(new_state, strict=False, assign=True)
    missing = [k for k in missing if not (text_cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ExportError(f"key mapping incomplete: missing {missing[:5]} ({len(missing)}), unexpected "
                          f"{unexpected[:5]} ({len(unexpected)})")
    model.tie_weights()
    model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    size = vcfg.image_size
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pad=True, do_convert_rgb=True)
    processor = _processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=_video_processor(image_processor),
                                        num_image_tokens=(size // vcfg.patch_size) ** 2,
                                        vision_feature_select_strategy="full", vision_aspect_ratio=mode,
                                        chat_template=tokenizer.chat_template)
    processor.save_pretrained(out)
    # written by the stand-ins without torchvision: name the classes transformers expects
    for f in out.glob("*.json"):
        spec = json.loads(f.read_text())
        if not isinstance(spec, dict):
            continue
        changed = False
        if spec.get("processor_class") not in (None, "LlavaOnevisionProcessor"):
            spec["processor_class"], changed = "LlavaOnevisionProcessor", True
        if f.name == "video_preprocessor_config.json":
            spec["video_processor_type"], changed = "LlavaOnevisionVideoProcessor", True
        if changed:
            f.write_text(json.dumps(spec, indent=2))
    # the policy files (checkpoint.py's list: action tokens, representation, statistics, run config); a head's
    # weights travel as EXTRA_HEADS below, taken from the model's own state dict
    checkpoint.copy_policy_files(ckpt, out, skip=(HEAD_FILE,))
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extra.items()}, str(out / EXTRA_HEADS))
    info = {
        "source": str(ckpt.resolve()), "trained_image_aspect_ratio": trained_mode, "vision_aspect_ratio": mode,
        "image_token_id": image_id, "video_token_id": video_id, "vision_config_from": vsource,
        "vision_layers": vcfg.num_hidden_layers, "dtype": str(dtype).replace("torch.", ""),
        "extra_heads": ({"file": EXTRA_HEADS, "parameters": sorted(extra),
                         "note": "not part of LlavaOnevisionForConditionalGeneration: load with "
                                 "safetensors.torch.load_file and apply to the LM's last hidden state"} if extra else None),
    }
    (out / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a llava_vla_plugin checkpoint folder (the run's output dir or checkpoint-N/)")
    parser.add_argument("out", help="new folder for the transformers checkpoint and processor")
    parser.add_argument("--image-aspect-ratio", default=None,
                        help="processor mode (default: the checkpoint's anyres mode, else anyres_max_9)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint, args.out, args.image_aspect_ratio, args.overwrite)
    except (ExportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"read {args.checkpoint}; wrote {args.out} (LlavaOnevisionForConditionalGeneration + processor, "
          f"{ACTION_CONFIG}, {STATS_NAME}, {EXPORT_INFO})")
    if info["trained_image_aspect_ratio"] != info["vision_aspect_ratio"]:
        print(f"note: trained with image_aspect_ratio={info['trained_image_aspect_ratio']!r}; transformers' processor "
              f"uses {info['vision_aspect_ratio']!r}. HFVLAPolicy reproduces the trained mode.")
    if info["extra_heads"]:
        print(f"note: {len(info['extra_heads']['parameters'])} parameters outside the LLaVA layout went to {EXTRA_HEADS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
