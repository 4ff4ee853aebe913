"""The one owner of "a VLA checkpoint": the files beside upstream's model that make it a policy, written,
read and carried here and nowhere else (issue 21).

    vla_action_tokenizer.json    action bins, token ids, prompt template          (action_tokenizer.py)
    vla_action_repr.json         representation, H, D, window rule                (action_repr.py)
    vla_action_head.safetensors  the parallel_l1 head's weights, where it has one (action_repr.py)
    vla_fast_tokenizer.json      the fast representation's FAST tokenizer (fast_codec.py; representations/fast.py)
    vla_inputs.json              the camera views and state a policy needs, where not the default primary
                                 view alone (core/inputs.py)
    vla_run_config.json          the settings that define the run (resume check);  (run_config.py)
                                 its vla_image_aug makes the policy centre-crop (core/augment.py)
    dataset_statistics.json      per-dataset q01/q99/mask to un-normalize actions (data_tools' contract)
    vla_export.json              only in a transformers export: what the export changed (infer/export_hf.py);
                                 its presence makes Policy.from_pretrained take the transformers backend

Why one place: the writer and each reader used to list a different subset. A LoRA merge copied only the
action tokenizer and the statistics, so a `bins_chunk` H=8 run's merged model loaded as `bins` with H=1
and played one step where eight were trained, silently. The classes beside each file still define its
content; this module says which files a checkpoint has, writes them together (`write`), reads them
together (`read`, with the old-checkpoint defaults of each reader) and carries them together
(`copy_policy_files`, for a merge or an export). A file added to a checkpoint is added to POLICY_FILES.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_tools.atomic import write_json
from llava_vla_plugin.core.fast_codec import FILE_NAME as FAST_TOKENIZER_FILE
from llava_vla_plugin.core.inputs import INPUTS_FILE, InputConfig
from llava_vla_plugin.core.representations import HEAD_FILE, REPR_FILE, ActionReprConfig
from llava_vla_plugin.core.action_tokenizer import CONFIG_NAME as ACTION_TOKENIZER_FILE
from llava_vla_plugin.core.action_tokenizer import ActionTokenizer
from llava_vla_plugin.core.normalization import STATS_NAME as STATS_FILE
from llava_vla_plugin.core.normalization import load_statistics
from llava_vla_plugin.core.run_config import RUN_CONFIG_NAME as RUN_CONFIG_FILE
from llava_vla_plugin.core.run_config import image_aug_of

EXPORT_INFO_FILE = "vla_export.json"

# Every file that travels with a policy (a merge or an export copies those present); the first two are required.
REQUIRED_FILES = (ACTION_TOKENIZER_FILE, STATS_FILE)
POLICY_FILES = (ACTION_TOKENIZER_FILE, STATS_FILE, REPR_FILE, HEAD_FILE, FAST_TOKENIZER_FILE, RUN_CONFIG_FILE, INPUTS_FILE)


class CheckpointError(FileNotFoundError):
    """A checkpoint directory that lacks a file a policy needs."""


@dataclass(frozen=True)
class VLACheckpoint:
    """What a reader of any checkpoint kind gets: the same action tokenizer, representation, statistics."""

    path: Path
    action_tokenizer: ActionTokenizer
    repr_config: ActionReprConfig  # a checkpoint written before representations existed reads as `bins`, H = 1
    statistics: dict
    # trained with --vla_image_aug (OpenVLA's random crop): inputs get OFT's centre crop (core/augment.py)
    image_aug: bool = False
    inputs: InputConfig = InputConfig()  # views and state (vla_inputs.json; absent: the primary view alone)


def missing_files(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    return [name for name in ("config.json", *REQUIRED_FILES) if not (path / name).is_file()]


def read(path: str | os.PathLike) -> VLACheckpoint:
    path = Path(path)
    missing = missing_files(path)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a llava_vla_plugin checkpoint (a training "
                              f"OUTPUT_DIR, one of its checkpoint-N folders, or OUTPUT_DIR/merged); copy the missing "
                              "files from the run's OUTPUT_DIR")
    action_tokenizer = ActionTokenizer.load(path)
    return VLACheckpoint(path, action_tokenizer, ActionReprConfig.load(path), load_statistics(path),
                         image_aug=image_aug_of(path), inputs=InputConfig.load(path))


def write(output_dir: str | os.PathLike, action_tokenizer: ActionTokenizer, statistics: dict, action_repr=None,
          model=None, state_dict=None, inputs: InputConfig | None = None) -> None:
    """The VLA files of a checkpoint the trainer saves (the run config is run_config.py's, written at the start):
    the action tokenizer, the representation (its config, and its head where it has one), the statistics, and the
    inputs where they are not the default (a checkpoint of the primary view alone is what it always was)."""
    os.makedirs(output_dir, exist_ok=True)
    action_tokenizer.save(output_dir)
    if inputs is not None and not inputs.is_default:
        inputs.save(output_dir)
    if action_repr is not None:
        action_repr.save(output_dir, model=model, state_dict=state_dict)
    write_json(os.path.join(output_dir, STATS_FILE), statistics)


def is_transformers_export(path: str | os.PathLike) -> bool:
    return (Path(path) / EXPORT_INFO_FILE).is_file()


def policy_files(path: str | os.PathLike) -> list[str]:
    """The POLICY_FILES present in `path`; a required one missing raises CheckpointError."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: copy it from the run's OUTPUT_DIR")
    return [name for name in POLICY_FILES if (path / name).is_file()]


def copy_policy_files(src: str | os.PathLike, dst: str | os.PathLike, skip: tuple[str, ...] = ()) -> list[str]:
    """Carry every policy file of `src` into `dst` (a merged or exported model); returns the names copied."""
    names = [n for n in policy_files(src) if n not in skip]
    for name in names:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return names
