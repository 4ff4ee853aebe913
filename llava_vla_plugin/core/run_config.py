"""Explicit resume, the run-configuration check, and optimizer-state pruning of older checkpoints.

Why: upstream resumes whenever OUTPUT_DIR holds a `checkpoint-*`, whatever changed since. A run
restarted with another image mode or learning rate then silently continues a different experiment.
Here resume is a choice (`--vla_resume auto|never|PATH`, the launcher's RESUME), every checkpoint
carries the settings that define the run (`vla_run_config.json`), and resuming under different
settings is refused with the list of what changed.

Disk: a checkpoint's optimizer state (AdamW: two fp32 moments per parameter, 2-4x the weights) is
only needed to resume, and only the newest checkpoint is resumed from. With
`--vla_keep_optimizer_state latest` (the default) older checkpoints keep their weights (usable for
eval, export or as a MODEL) and lose their optimizer state once a newer checkpoint is written.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from data_tools.atomic import write_text

log = logging.getLogger(__name__)

RUN_CONFIG_NAME = "vla_run_config.json"
LAUNCH_PENDING, LAUNCH_CONFIG = "launch_config.pending.yaml", "launch_config.yaml"  # scripts/launch_config.py
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                "adapter_model.safetensors", "adapter_model.bin")
RESUME_MODES = ("auto", "never")

# Settings that define what a run trains on and how; a resumed run must match them. Not here on
# purpose: max_steps / num_train_epochs / save_steps / eval steps / workers (extending or
# re-scheduling a run is what resuming is for) and the number of processes (DeepSpeed checks that).
RUN_KEYS = ("model", "vision_tower", "data_path", "image_folder", "image_aspect_ratio", "image_grid_pinpoints",
            "mm_patch_merge_type", "mm_tunable_parts", "model_max_length", "per_device_train_batch_size",
            "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay",
            "seed", "vla_data_seed", "vla_blind", "lora_enable", "bf16", "fp16", "vla_action_repr", "vla_horizon",
            "vla_window_mode", "vla_image_aug", "vla_cameras", "vla_proprio", "vla_remix_reference", "vla_remix_step_size",
            "vla_remix_smoothing")
# vla_image_aug is also what the policy reads from a checkpoint (image_aug_of): a checkpoint trained with
# OpenVLA's random crop is served with OFT's centre crop (core/augment.py center_crop).


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders of a run, oldest first (by step, not by name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def has_optimizer_state(ckpt: Path) -> bool:
    return (ckpt / "optimizer.pt").exists() or any(p.is_dir() for p in ckpt.glob("global_step*"))


def resolve_resume(mode: str, output_dir: str) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh start. Raises ValueError saying what to do."""
    found = checkpoints(output_dir)
    if mode == "never":
        if found:
            raise ValueError(f"{output_dir} already holds {', '.join(p.name for p in found)} and RESUME=never: not training "
                             "over them. Use a new OUTPUT_DIR, delete those checkpoints, or set RESUME=auto to continue the run.")
        return None
    if mode == "auto":
        return str(found[-1]) if found else None
    path = Path(mode).expanduser()
    if not (path / "trainer_state.json").exists():
        raise ValueError(f"RESUME={mode}: not a training checkpoint (no trainer_state.json there). Pass a "
                         f"checkpoint-N folder, RESUME=auto (the newest in OUTPUT_DIR) or RESUME=never.")
    return str(path.resolve())


def run_config(args: Any, data_args: Any, model_config: Any) -> dict:
    """The settings in RUN_KEYS, from the training arguments, data arguments and model config."""
    def first(name: str) -> Any:
        for source in (args, data_args, model_config):
            if source is not None and hasattr(source, name):
                return getattr(source, name)
        return None

    cfg = {key: first(key) for key in RUN_KEYS if key not in ("model", "vision_tower")}
    cfg["model"] = getattr(model_config, "_name_or_path", None)
    cfg["vision_tower"] = getattr(model_config, "mm_vision_tower", None)
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in cfg.items()}


def image_aug_of(folder: str | os.PathLike) -> bool:
    """Whether the checkpoint in `folder` was trained with --vla_image_aug True (its vla_run_config.json; a
    checkpoint without the file or the key, i.e. older than the option, was not)."""
    path = Path(folder) / RUN_CONFIG_NAME
    if not path.is_file():
        return False
    try:
        value = json.loads(path.read_text()).get("vla_image_aug", False)
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable ({e}); copy vla_run_config.json from the run's OUTPUT_DIR") from None
    if value is None:  # written without data arguments (a run_config() caller that passed none)
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{path}: vla_image_aug is {value!r}, expected true or false")
    return value


def write_run_config(folder: str | os.PathLike, config: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, RUN_CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))


def check_resumable(ckpt: str, config: dict) -> None:
    """Refuse a checkpoint trained under other settings, or one whose optimizer state was pruned."""
    path = Path(ckpt)
    if not has_optimizer_state(path):
        raise ValueError(f"{ckpt} has no optimizer state (only the newest checkpoint keeps it, see "
                         "--vla_keep_optimizer_state): resume from the newest checkpoint, or start a new run from these "
                         "weights with MODEL=" + str(path) + " and a new OUTPUT_DIR.")
    saved_file = path / RUN_CONFIG_NAME
    if not saved_file.exists():
        log.warning("%s has no %s (written by an older version): cannot check that the configuration is unchanged", ckpt,
                    RUN_CONFIG_NAME)
        return
    saved = json.loads(saved_file.read_text())
    changed = [f"{k}: {_short(saved.get(k))} -> {_short(config.get(k))}" for k in RUN_KEYS if k in saved and saved.get(k) != config.get(k)]
    if changed:
        raise ValueError(f"refusing to resume from {ckpt}: the configuration changed since it was saved ("
                         + "; ".join(changed) + "). Run with the checkpoint's settings to continue it, or start a new run "
                         "with a new OUTPUT_DIR (or RESUME=never into an empty one).")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...]"


def commit_launch_config(output_dir: str) -> None:
    """The launcher's resolved settings become the run's record only once the run really starts."""
    pending = os.path.join(output_dir, LAUNCH_PENDING)
    if os.path.exists(pending):
        os.replace(pending, os.path.join(output_dir, LAUNCH_CONFIG))


NEW_OUTPUT_DIR_ENV = "VLA_LAUNCH_NEW_OUTPUT_DIR"  # set by the launcher to OUTPUT_DIR when it created that folder


def discard_launch_config(output_dir: str) -> str | None:
    """A launch that stops before its run starts (bad input, a refused resume, Ctrl-C while loading) leaves
    no record of a run that never was: the launcher's pending settings file goes, and so does OUTPUT_DIR when
    the launcher created it for this launch and it is still empty. Returns what was done, in words (None:
    nothing to do, e.g. the run had started)."""
    pending = Path(output_dir) / LAUNCH_PENDING
    if not pending.exists():
        return None
    pending.unlink(missing_ok=True)
    done = f"removed {pending} (the settings of a run that did not start)"
    if os.environ.get(NEW_OUTPUT_DIR_ENV) == str(output_dir):
        try:  # several ranks may get here at once
            left = sorted(p.name for p in Path(output_dir).iterdir())
            if not left:
                Path(output_dir).rmdir()
                done += f" and the empty {output_dir} this launch had created"
            else:
                done += f"; kept {output_dir}, created by this launch: it holds {', '.join(left[:5])}"
        except OSError:
            pass
    return done


def prune_optimizer_state(output_dir: str, keep: str) -> list[str]:
    """Drop the optimizer state of every checkpoint but the newest (keep="latest"); "all" keeps it all.

    DeepSpeed's global_step* folder is removed only where the checkpoint also has consolidated
    weights (ZeRO-3 without stage3_gather_16bit_weights_on_model_save keeps its weights only there)."""
    if keep == "all":
        return []
    if keep != "latest":
        raise ValueError(f"--vla_keep_optimizer_state must be 'latest' or 'all', not {keep!r}")
    removed = []
    for ckpt in checkpoints(output_dir)[:-1]:
        if (ckpt / "optimizer.pt").exists():
            (ckpt / "optimizer.pt").unlink()
            removed.append(str(ckpt / "optimizer.pt"))
        if any((ckpt / f).exists() for f in WEIGHT_FILES):
            for ds in ckpt.glob("global_step*"):
                if ds.is_dir():
                    shutil.rmtree(ds)
                    removed.append(str(ds))
    if removed:
        log.info("removed optimizer state of older checkpoints (only the newest is resumed from): %s", ", ".join(removed))
    return removed
