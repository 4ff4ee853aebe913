"""The real LLaVA-OneVision architectures, written down here (never downloaded), with random weights.

    python -m llava_vla_plugin.testing.onevision_configs OUT_DIR [--llm 0.5b] [--dtype bfloat16]

writes a random-weight `llava_qwen` VLA checkpoint of the real shape (what GPU checks and the export
tests load), with the tower published into OUT_DIR/hf_home as for the tiny model (tiny_model.py).

Why random weights: the point is the architecture (shapes, memory, visual-token counts, speed,
export key mapping), and nothing may download weights at test time. The values are those of
lmms-lab/llava-onevision-qwen2-{0.5b,7b}-ov's config.json and of Qwen2-{0.5B,7B}-Instruct:

* language model: Qwen2 (0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  vocabulary 151,936, tied; 7B: hidden 3584, 28 layers, 28 heads, 4 KV heads, intermediate 18944,
  vocabulary 152,064, untied). The 256 action tokens sit in Qwen2's spare rows (151,646 + 256 <= 151,936).
* vision: google/siglip-so400m-patch14-384 (27 layers, hidden 1152, intermediate 4304, 16 heads).
  OneVision's `mm_vision_select_layer: -2` is realised by upstream's siglip_encoder.py deleting the
  last layer when it loads the tower (`del encoder.layers[-1:]`, head -> Identity) and taking the
  last remaining hidden state; the tower that runs has 26 layers. transformers' converter writes
  the same thing as `num_hidden_layers=26, vision_feature_layer=-1`.
* projector `mlp2x_gelu`, `spatial_unpad`, `anyres_max_9` with the 36 grid pinpoints
  (1x1 ... 6x6 tiles of 384 px), `mm_spatial_pool_mode: bilinear`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

# visual tokens per frame: visual_tokens.py owns the formula and the documented table (re-exported here)
from llava_vla_plugin.core.visual_tokens import DOCUMENTED_VISUAL_TOKENS  # noqa: F401

RANDOM_TOWER_ID = "vla-random/siglip-so400m-patch14-384"  # "siglip" in the id routes upstream to its SigLIP tower

QWEN2_COMMON = {
    "model_type": "qwen2", "hidden_act": "silu", "max_position_embeddings": 32768, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": 32768, "attention_dropout": 0.0,
    "initializer_range": 0.02, "bos_token_id": 151643, "eos_token_id": 151645, "use_cache": True,
}
LLM_CONFIGS = {
    "0.5b": {**QWEN2_COMMON, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_window_layers": 24},
    "7b": {**QWEN2_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_window_layers": 28},
    # tiny_model.py's 9.8M-parameter Qwen2, for --tiny rehearsals of scripts written for the real sizes
    "tiny": {**QWEN2_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
             "max_window_layers": 2},
}
# Published parameter counts of the language models (Qwen2 model cards / safetensors index), which the
# configs above must reproduce.
LLM_PARAMETERS = {"0.5b": 494_032_768, "7b": 7_615_616_512}

SIGLIP_SO400M_384 = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                     "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
SIGLIP_LAYERS_USED = SIGLIP_SO400M_384["num_hidden_layers"] - 1  # mm_vision_select_layer -2, see the docstring

ANYRES_MAX_9_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]

# The OneVision fields of llava-onevision-qwen2-*-ov/config.json that change what the model computes.
ONEVISION_FIELDS = {
    "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_projector_type": "mlp2x_gelu",
    "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
    "image_grid_pinpoints": ANYRES_MAX_9_PINPOINTS, "mm_spatial_pool_mode": "bilinear", "mm_newline_position": "grid",
    "mm_hidden_size": 1152, "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_resampler_type": None,
    "image_crop_resolution": None, "image_split_resolution": None, "tokenizer_padding_side": "right",
    "tokenizer_model_max_length": 32768,
}


@dataclass
class OneVisionBundle:
    """A built model with what a policy needs beside it."""
    model: object
    tokenizer: object
    image_processor: object
    action_tokenizer: object


def qwen2_config(llm: str):
    from transformers import Qwen2Config

    if llm not in LLM_CONFIGS:
        raise ValueError(f"unknown language model {llm!r}: one of {sorted(LLM_CONFIGS)}")
    cfg = dict(LLM_CONFIGS[llm])
    cfg.pop("model_type")
    return Qwen2Config(**cfg)


def llava_config(llm: str, image_aspect_ratio: str = "anyres_max_9"):
    """LlavaQwenConfig with the LM and OneVision fields (no vision tower named: set when it is built)."""
    from llava.model.language_model.llava_qwen import LlavaQwenConfig

    config = LlavaQwenConfig(**qwen2_config(llm).to_dict())
    config.architectures = ["LlavaQwenForCausalLM"]
    for key, value in ONEVISION_FIELDS.items():
        setattr(config, key, value)
    config.image_aspect_ratio = image_aspect_ratio
    return config


def publish_random_siglip(hf_home: Path, dtype=None, seed: int = 0) -> Path:
    """The so400m-384 tower, random weights, under RANDOM_TOWER_ID in an offline HF cache (0.86 GB in bf16)."""
    from llava_vla_plugin.apps.tiny_model import publish_tiny_siglip

    overrides = {k: v for k, v in SIGLIP_SO400M_384.items() if k != "num_hidden_layers"}
    return publish_tiny_siglip(hf_home, RANDOM_TOWER_ID, seed=seed, layers=SIGLIP_SO400M_384["num_hidden_layers"],
                               config_overrides=overrides, dtype=dtype)


def build_onevision(llm: str = "0.5b", image_aspect_ratio: str = "anyres_max_9", dtype=None,
                    vision_tower: str = RANDOM_TOWER_ID, seed: int = 0) -> OneVisionBundle:
    """Assemble llava_qwen with upstream's own classes, in this process, with the action tokens added.

    The tower must resolve offline (HF_HOME set before transformers was imported, publish_random_siglip
    run). Parameters are created directly in `dtype` (default float32): no transient fp32 copy.
    """
    import torch
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
    try:
        from llava_vla_plugin import state
    except ImportError:  # main after the LoRA merge: add_action_tokens makes its own ActionTokenizer
        state = None
    from llava_vla_plugin.train.register import add_action_tokens
    from llava_vla_plugin.apps.tiny_model import build_qwen2_tokenizer

    dtype = dtype or torch.float32
    torch.manual_seed(seed)
    config = llava_config(llm, image_aspect_ratio)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlavaQwenForCausalLM(config)
        args = SimpleNamespace(
            vision_tower=vision_tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
            pretrain_mm_mlp_adapter=None, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
            mm_resampler_type=None, vision_tower_pretrained=None, unfreeze_mm_vision_tower=True,
            mm_tunable_parts=ONEVISION_FIELDS["mm_tunable_parts"], add_faster_video=False)
        model.get_model().initialize_vision_modules(model_args=args)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to(dtype)
    for key, value in ONEVISION_FIELDS.items():  # initialize_vision_modules overwrites some of them
        setattr(model.config, key, value)
    model.config.image_aspect_ratio = image_aspect_ratio
    tokenizer = build_qwen2_tokenizer()
    action_tokenizer = ActionTokenizer()
    if state is not None:  # branches where the hooks still hand the action tokenizer over in state.py
        state.set_action_tokenizer(action_tokenizer)
    add_action_tokens(model, tokenizer)
    action_tokenizer.add_to_tokenizer(tokenizer)  # binds the ids (idempotent: the tokens are there)
    image_processor = model.get_vision_tower().image_processor
    return OneVisionBundle(model, tokenizer, image_processor, action_tokenizer)


def save_vla_checkpoint(bundle: OneVisionBundle, out_dir: Path, statistics: dict) -> Path:
    """What VLATrainer writes: upstream's checkpoint + tokenizer + vla_action_tokenizer.json + statistics."""
    from llava_vla_plugin.train.trainer import write_vla_files

    out_dir = Path(out_dir)
    if "qwen" not in out_dir.name.lower():
        raise ValueError(f"{out_dir}: upstream picks the model class by the path containing 'qwen'; rename it")
    bundle.model.save_pretrained(out_dir, safe_serialization=True)
    bundle.tokenizer.save_pretrained(out_dir)
    write_vla_files(str(out_dir), bundle.action_tokenizer, statistics)
    return out_dir


def example_statistics(name: str = "bridge_orig") -> dict:
    """OpenVLA-format statistics for random-weight checkpoints (un-normalization needs some)."""
    return {name: {"action": {"mean": [0.0] * 7, "std": [0.5] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
                              "q01": [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0],
                              "q99": [0.03, 0.04, 0.03, 0.1, 0.1, 0.2, 1.0], "mask": [True] * 6 + [False]},
                   "num_transitions": 1, "num_trajectories": 1}}


def meta_parameter_report(llm: str) -> dict:
    """Parameter counts and key shapes on the meta device (no memory): LM, projector, the 26-layer tower."""
    import torch
    from transformers import Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from llava.model.multimodal_projector.builder import build_vision_projector

    config = llava_config(llm)
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(qwen2_config(llm))
        projector = build_vision_projector(config)
        tower = SiglipVisionModel(SiglipVisionConfig(**{**SIGLIP_SO400M_384, "num_hidden_layers": SIGLIP_LAYERS_USED}))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  (tied weights counted once)
    layer = lm.model.layers[0]
    return {
        "llm": count(lm), "projector": count(projector), "vision_tower": count(tower) - count(tower.vision_model.head),
        "image_newline": config.hidden_size,
        "tied": lm.lm_head.weight is lm.model.embed_tokens.weight,
        "shapes": {
            "embed_tokens": list(lm.model.embed_tokens.weight.shape), "lm_head": list(lm.lm_head.weight.shape),
            "q_proj": list(layer.self_attn.q_proj.weight.shape), "k_proj": list(layer.self_attn.k_proj.weight.shape),
            "v_proj": list(layer.self_attn.v_proj.weight.shape), "o_proj": list(layer.self_attn.o_proj.weight.shape),
            "gate_proj": list(layer.mlp.gate_proj.weight.shape), "down_proj": list(layer.mlp.down_proj.weight.shape),
            "projector.0": list(projector[0].weight.shape), "projector.2": list(projector[2].weight.shape),
            "layers": len(lm.model.layers), "tower_layers": len(tower.vision_model.encoder.layers),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder for hf_home/ and the checkpoint llava-onevision-<llm>-random-qwen/")
    parser.add_argument("--llm", default="0.5b", choices=sorted(LLM_CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="dtype the weights are built and saved in (default: bfloat16, half the disk)")
    parser.add_argument("--image-aspect-ratio", default="anyres_max_9", choices=["pad", "anyres_max_9"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir).resolve()
    hf_home = out / "hf_home"
    import os

    os.environ.update({"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"})
    import torch

    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    publish_random_siglip(hf_home, dtype=dtype, seed=args.seed)
    bundle = build_onevision(args.llm, args.image_aspect_ratio, dtype=dtype, seed=args.seed)
    ckpt = save_vla_checkpoint(bundle, out / f"llava-onevision-{args.llm}-random-qwen", example_statistics())
    print(json.dumps({"checkpoint": str(ckpt), "vision_tower": RANDOM_TOWER_ID, "HF_HOME": str(hf_home),
                      "seconds": round(time.time() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
