"""LoRA fine-tuning end to end: train the action-token rows, save complete checkpoints, load or merge them.

    bash scripts/finetune_ov_vla.sh --lora_enable True [--lora_r 32 --lora_alpha 16]
    python -m llava_vla_plugin.train.lora merge runs/ov-vla/checkpoint-1000 --out runs/ov-vla-1000-merged

Upstream's `--lora_enable` wraps the language model's linear layers in LoRA adapters before the
tokenizer exists, so the 256 action tokens added later (register.add_action_tokens) would keep
their vocabulary-mean rows for the whole run: the model cannot learn to emit them. Here:

  * training: the trainer gives the PEFT model PEFT's trainable-token adapter over the action ids
    (`trainable_token_indices`): only those 256 rows of the input embedding and the LM head are
    trained and saved (256 x hidden values), not the whole 152k-row matrix that
    `modules_to_save=["embed_tokens", "lm_head"]` would copy, and the 0.5B model's tied
    embedding/LM head stay tied (PEFT ties the two adapters);
  * checkpoints (every checkpoint-N and OUTPUT_DIR): the adapter (LoRA + action rows,
    adapter_model.safetensors), the other trained weights (projector, vision tower if tuned) in
    upstream's `non_lora_trainables.bin`, the training config.json, the tokenizer with the action
    tokens and the VLA files. Upstream's own LoRA save after training drops the action rows; the
    state-dict helpers it calls are replaced by `peft_state_maybe_zero_3` /
    `non_lora_state_maybe_zero_3` (register.py);
  * loading: `load_lora_checkpoint` loads the base model named in adapter_config.json (or
    `base=`), the checkpoint's config and tokenizer, the non-LoRA weights and the adapter, merged
    in memory by default. Upstream's builder has a LoRA path, but it builds a Llama model for every
    non-Mistral/Gemma name (wrong for Qwen) and merges before the action rows could be restored;
  * merging: `merge_checkpoint` writes a full checkpoint that plain upstream `load_pretrained_model`
    loads. Training runs it on OUTPUT_DIR after the final save (OUTPUT_DIR/merged) unless
    `--vla_lora_merge False`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from data_tools.atomic import atomic_open
from llava_vla_plugin.core import checkpoint
log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
HEAD_PARAMS = "vla_action_head."  # a representation's head (core/representations/base.head_host), saved in HEAD_FILE
NON_LORA_NAME = "non_lora_trainables.bin"
MERGED_SUBDIR = "merged"
# Parameters owned by PEFT's trainable-token adapter (saved in the adapter, not in non_lora_trainables.bin).
TOKEN_ADAPTER_KEY = "token_adapter."
# Keys of the checkpoint's config.json that describe the base model's weights, not the training setup.
_WEIGHT_CONFIG_KEYS = {"vocab_size", "_name_or_path", "architectures", "torch_dtype", "dtype", "transformers_version",
                       "model_type", "use_cache"}

_pending_merge: dict | None = None


class LoRACheckpointError(ValueError):
    """A LoRA checkpoint that lacks a file or does not fit its base model."""


def is_lora_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ---- training --------------------------------------------------------------------------------------
def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def enable_action_token_training(model, token_ids) -> int:
    """Make the action-token rows of the input embedding and the LM head trainable in a PEFT model.

    Must run after the action tokens were added (their rows initialised) and before the optimizer
    is built. With tied embeddings one adapter serves both (PEFT ties the LM head's to it); untied
    (7B), the LM head gets its own adapter over the same ids. Returns the number of trainable
    values added.
    """
    from peft.utils.other import set_additional_trainable_modules

    ids = [int(i) for i in token_ids]
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    if getattr(config, "trainable_token_indices", None):
        return 0  # already set (e.g. a second trainer over the same model)
    base = model.get_base_model()
    model_config = base.config.to_dict()
    embed_name = next(n for n, m in base.named_modules() if m is base.get_input_embeddings())
    if model_config.get("tie_word_embeddings", False):
        config.trainable_token_indices = ids
    else:
        head_name = next(n for n, m in base.named_modules() if m is base.get_output_embeddings())
        config.trainable_token_indices = {embed_name.split(".")[-1]: ids, head_name.split(".")[-1]: ids}
    set_additional_trainable_modules(model, config, model_config, adapter)
    added = sum(p.numel() for n, p in model.named_parameters() if TOKEN_ADAPTER_KEY in n and p.requires_grad)
    if not added:
        raise RuntimeError("PEFT's trainable-token adapter added no trainable parameters for the action tokens")
    log.warning("LoRA: action-token rows trainable (%d tokens, %d values, embeddings %s)", len(ids), added,
                "tied" if model_config.get("tie_word_embeddings") else "untied: input and LM head")
    return added


def _gather(named_params):
    """Full tensors on CPU (DeepSpeed ZeRO-3 partitions gathered)."""
    from llava.train.train import maybe_zero_3

    return {k: maybe_zero_3(v, ignore_status=True).cpu() for k, v in named_params}


def peft_state_maybe_zero_3(named_params, bias):
    """Upstream's get_peft_state_maybe_zero_3 plus the action-token rows (PEFT's token adapter)."""
    named_params = list(named_params)
    state = upstream_train_original("get_peft_state_maybe_zero_3")(named_params, bias)
    state.update(_gather((k, v) for k, v in named_params if TOKEN_ADAPTER_KEY in k))
    return state


def non_lora_state_maybe_zero_3(named_params, require_grad_only=True):
    """Trained weights outside the adapter (projector, vision tower if tuned), for non_lora_trainables.bin."""
    return _gather((k, v) for k, v in named_params if "lora_" not in k and TOKEN_ADAPTER_KEY not in k
                   and (v.requires_grad or not require_grad_only))


# Module-name parts that belong to the vision side: upstream's find_all_linear_names skips them too.
_VISION_KEYWORDS = ("mm_projector", "vision_tower", "vision_resampler")


def language_model_lora_targets(model) -> str:
    """LoRA's `target_modules` for the language model's linear layers only, as one anchored regex.

    Why not upstream's `find_all_linear_names` (llava/train/train.py:245-258): it skips the vision
    modules while collecting, but returns bare suffixes (`q_proj`, `k_proj`, `v_proj`, ...), and PEFT
    matches a list by suffix (peft/tuners/tuners_utils.py, check_target_module_exists), so SigLIP's
    `self_attn.{q,k,v}_proj` got adapters too. With the launcher's default `mm_tunable_parts`
    (vision tower tuned in full), upstream then unfreezes every `vision_tower` parameter, the LoRA
    base weights included, and `non_lora_trainables.bin` held `...k_proj.base_layer.weight` names that
    no plain model has: the run trained, saved, and could not be loaded (issue 26).

    The decision: adapters on the language model's linear layers (attention and MLP of every
    decoder layer; never `lm_head`, whose action rows PEFT's token adapter trains). The projector
    and the vision tower train in full or stay frozen, as `--mm_tunable_parts` says, and are saved
    as plain weights. A string target is matched with `re.fullmatch` against each module's full name
    by PEFT, so the regex names each layer kind once, with a digits pattern for the layer index.
    """
    import re

    import torch

    patterns = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or any(k in name for k in _VISION_KEYWORDS):
            continue
        if name.split(".")[-1] == "lm_head":
            continue
        patterns.add(r"\.\d+\.".join(re.escape(p) for p in re.split(r"\.\d+\.", name)))
    if not patterns:
        raise RuntimeError("LoRA: the model has no language-model linear layers to adapt")
    return "(?:" + "|".join(sorted(patterns)) + ")"


_originals: dict = {}


def upstream_train_original(name: str):
    import llava.train.train as upstream_train

    return _originals.get(name, getattr(upstream_train, name))


def install_upstream_save_hooks() -> None:
    """Make upstream's LoRA setup adapt the language model only (`language_model_lora_targets`) and
    its post-training LoRA save (train.py, end of train()) keep the action rows."""
    import llava.train.train as upstream_train

    for name, fn in (("get_peft_state_maybe_zero_3", peft_state_maybe_zero_3),
                     ("get_peft_state_non_lora_maybe_zero_3", non_lora_state_maybe_zero_3),
                     ("find_all_linear_names", language_model_lora_targets)):
        _originals.setdefault(name, getattr(upstream_train, name))
        setattr(upstream_train, name, fn)


def save_lora_extras(model, output_dir: str, state_dict: dict | None = None) -> None:
    """What PEFT's save_pretrained leaves out of a LoRA checkpoint: non-LoRA trained weights and config.json.

    `state_dict` is the full (gathered) state dict the trainer saves under DeepSpeed; without it the
    parameters are read directly.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and TOKEN_ADAPTER_KEY not in n]
    if state_dict is not None:
        missing = [n for n in names if n not in state_dict]
        if missing:
            raise RuntimeError(f"the saved state dict lacks trained parameters {missing[:3]}: cannot write {NON_LORA_NAME}")
        extras = {n: state_dict[n].detach().cpu() for n in names}
    else:
        params = dict(model.named_parameters())
        extras = {n: params[n].detach().cpu() for n in names}
    with atomic_open(os.path.join(output_dir, NON_LORA_NAME), "wb") as f:
        torch.save(extras, f)
    model.get_base_model().config.save_pretrained(output_dir)


def load_non_lora_trainables(model, checkpoint: str | os.PathLike) -> int:
    """Resume (without DeepSpeed, whose own checkpoint holds everything): HF's trainer restores the
    adapter only; the projector / vision tower weights trained beside it come from here."""
    path = Path(checkpoint) / NON_LORA_NAME
    if not path.is_file():
        raise LoRACheckpointError(f"{checkpoint} lacks {NON_LORA_NAME}: cannot resume the weights trained beside "
                                  "the adapter (projector, vision tower); resume from a checkpoint this plugin wrote")
    extras = torch.load(path, map_location="cpu")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and TOKEN_ADAPTER_KEY not in n}
    missing = sorted(trained - set(extras))
    unexpected = sorted(set(extras) - {n for n, _ in model.named_parameters()})
    if missing or unexpected:
        raise LoRACheckpointError(f"{path} does not match this run's trained parameters (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}): was mm_tunable_parts changed?")
    model.load_state_dict(extras, strict=False)
    return len(extras)


def request_merge(output_dir: str) -> None:
    """Called by the trainer on the saving rank; train.main merges once upstream's train() returned."""
    global _pending_merge
    _pending_merge = {"path": output_dir}


def merge_pending() -> Path | None:
    """Merge OUTPUT_DIR into OUTPUT_DIR/merged after training, from the files on disk (so the saved
    adapter is proven complete, and no training state or collective is pending)."""
    global _pending_merge
    if _pending_merge is None:
        return None
    path = Path(_pending_merge["path"])
    _pending_merge = None
    out = merge_checkpoint(path, path / MERGED_SUBDIR)
    log.warning("LoRA: merged checkpoint written to %s (plain upstream load_pretrained_model loads it)", out)
    return out


# ---- loading ---------------------------------------------------------------------------------------
def base_model_of(path: str | os.PathLike) -> str:
    cfg = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise LoRACheckpointError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path: pass base=<the MODEL trained from>")
    return base


def load_lora_checkpoint(path: str | os.PathLike, base: str | None = None, device: str = "cpu", torch_dtype: str = "float32",
                         attn_implementation: str = "sdpa", merge: bool = True):
    """(tokenizer, model, image_processor) from a LoRA checkpoint: base + non-LoRA weights + adapter.

    `merge=False` keeps the PEFT model (LoRA applied on the fly), e.g. to compare or keep training.
    """
    from llava.model.builder import load_pretrained_model
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = Path(path)
    for name in (ADAPTER_CONFIG, "config.json", NON_LORA_NAME, "tokenizer_config.json"):
        if not (path / name).is_file():
            raise LoRACheckpointError(f"{path} lacks {name}: not a complete LoRA checkpoint of llava_vla_plugin "
                                      "(written by scripts/finetune_ov_vla.sh --lora_enable True)")
    base = base or base_model_of(path)
    if not Path(base).is_dir() and not os.path.isabs(base) and (path / base).is_dir():
        base = str(path / base)
    trained_config = json.loads((path / "config.json").read_text())
    overwrite = {k: v for k, v in trained_config.items() if k not in _WEIGHT_CONFIG_KEYS}
    try:
        with _no_vocabulary_shrink():
            _, model, image_processor, _ = load_pretrained_model(
                base, None, "llava_qwen", device_map=str(device), torch_dtype=torch_dtype,
                attn_implementation=attn_implementation, overwrite_config=overwrite)
    except OSError as e:
        raise OSError(f"loading the LoRA base model {base!r} of {path} failed: {e}\n(pass base=/--base to name where "
                      "the model the run was trained from lies)") from e
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # a base model without the action tokens: make room (they come from the adapter)
        model.resize_token_embeddings(len(tokenizer))
    # The adapter first, then the weights trained beside it under the names they were saved with (the PEFT
    # model's): a checkpoint whose adapters also wrapped modules that train in full (the vision tower's
    # q/k/v_proj, written before language_model_lora_targets) saved those as `...base_layer.weight`, which
    # only the wrapped model has. Loading into the unwrapped base model refused such runs (issue 26).
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    extras = torch.load(path / NON_LORA_NAME, map_location="cpu")
    names = {n for n, _ in model.named_parameters()}
    # A head trained beside the adapter (parallel_l1) is in the file for resume; its owner is the representation's
    # HEAD_FILE, which the policy's backend loads after this (action_repr.load_into), merged or not.
    extras = {_peft_key(k, names): v for k, v in extras.items() if HEAD_PARAMS not in k}
    unexpected = sorted(k for k in extras if k not in names)
    if unexpected:
        raise LoRACheckpointError(f"{path / NON_LORA_NAME} has weights the base model {base!r} lacks: "
                                  f"{unexpected[:3]} (was the run trained from another model?)")
    model.load_state_dict(extras, strict=False)
    model = model.merge_and_unload() if merge else model
    model.to(device)
    model.eval()
    return tokenizer, model, image_processor


@contextlib.contextmanager
def _no_vocabulary_shrink():
    """Keep every embedding row of the base model while upstream's builder loads it.

    The builder resizes the embeddings to its tokenizer's length (llava/model/builder.py:294 at
    df17966), which drops the rows Qwen2 reserves past it (151,936 rows on disk, 151,646 tokens).
    A merged LoRA checkpoint then had fewer rows than a full fine-tune's, and the transformers export,
    which appends <image>/<video> rows within the reserve, refused it (issue 26); the rows it dropped
    would also have come back re-initialised at random. Growing is still allowed.
    """
    from llava.model.language_model.llava_qwen import LlavaQwenForCausalLM

    original = LlavaQwenForCausalLM.resize_token_embeddings

    def resize(self, new_num_tokens=None, *args, **kwargs):
        if new_num_tokens is not None and new_num_tokens < self.get_input_embeddings().weight.shape[0]:
            return self.get_input_embeddings()
        return original(self, new_num_tokens, *args, **kwargs)

    LlavaQwenForCausalLM.resize_token_embeddings = resize
    try:
        yield
    finally:
        LlavaQwenForCausalLM.resize_token_embeddings = original


def _peft_key(key: str, names: set[str]) -> str:
    """A saved parameter name -> the PEFT model's (names saved without PEFT's prefix get it)."""
    return key if key in names or f"base_model.model.{key}" not in names else f"base_model.model.{key}"


def merge_checkpoint(path: str | os.PathLike, out: str | os.PathLike, base: str | None = None) -> Path:
    """Write a full checkpoint (model, tokenizer, VLA files) with the LoRA checkpoint at `path` merged in."""
    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    path, out = Path(path), Path(out)
    dtype = json.loads((path / "config.json").read_text()).get("torch_dtype") or "float32"
    dtype = dtype if dtype in ("float16", "bfloat16", "float32") else "float32"
    tokenizer, model, _ = load_lora_checkpoint(path, base=base, device="cpu", torch_dtype=dtype, merge=True)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.config.use_cache = True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # Every policy file (checkpoint.py owns the list): a merge that copied only some lost the representation
    # (a bins_chunk H=8 run's merged model answered one step, issue 21).
    ActionTokenizer.load(path)  # refuses a checkpoint whose action tokenizer is missing or unreadable
    checkpoint.copy_policy_files(path, tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---- CLI -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_vla_plugin.train.lora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge a LoRA checkpoint (OUTPUT_DIR or checkpoint-N) into a full checkpoint")
    m.add_argument("checkpoint", help="LoRA checkpoint directory (has adapter_config.json)")
    m.add_argument("--out", required=True, help="where to write the merged checkpoint")
    m.add_argument("--base", default=None, help="the model the run was trained from (default: adapter_config.json's)")
    args = parser.parse_args(argv)
    if not is_lora_checkpoint(args.checkpoint):
        print(f"error: {args.checkpoint} has no {ADAPTER_CONFIG}: not a LoRA checkpoint", file=sys.stderr)
        return 2
    out = merge_checkpoint(args.checkpoint, args.out, base=args.base)
    print(f"merged {args.checkpoint} -> {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
