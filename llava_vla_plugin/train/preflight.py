"""Bad launch input, caught before anything heavy loads (issue 26): the data paths and the VLA options.

    python -m llava_vla_plugin.train.preflight [the trainer's arguments]     exit 0, or 2 with one line per problem

scripts/finetune_ov_vla.sh runs it before it creates or writes anything in OUTPUT_DIR (so a refused
launch leaves nothing behind); `python -m llava_vla_plugin.train` runs the same check first. It reads
the trainer's final argument list (the launcher's defaults, CONFIG's ARGS, then the user's extra
arguments: the last occurrence of a flag wins, as in the trainer) and checks what would otherwise fail
only after the model has loaded: --data_path / --vla_val_data (a data file, or a mixture YAML whose
files exist), --image_folder, --vla_action_repr / --vla_horizon / --vla_window_mode (the registry in
action_repr.py decides), --vla_image_aug (a bool, not with persistent workers), a local
--model_name_or_path, and --vla_resume. Messages name the launcher
variable and the trainer flag, the value, and what to do. Cost: ~4 s, most of it importing torch
(action_repr.py's registry).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

# trainer flag -> the launcher variable that sets it (messages name both)
LAUNCHER_NAMES = {"--data_path": "DATA", "--image_folder": "IMAGE_FOLDER", "--vla_val_data": "VAL_DATA",
                  "--vla_action_repr": "ACTION_REPR", "--vla_horizon": "HORIZON", "--vla_window_mode": "WINDOW_MODE",
                  "--vla_repr_options": "REPR_OPTIONS", "--vla_image_aug": "IMAGE_AUG",
                  "--model_name_or_path": "MODEL", "--vla_resume": "RESUME", "--output_dir": "OUTPUT_DIR",
                  "--vla_remix_reference": "REMIX_REFERENCE", "--gradient_accumulation_steps": "GRAD_ACCUM",
                  "--vla_cameras": "CAMERAS", "--vla_proprio": "PROPRIO"}


def _name(flag: str) -> str:
    return f"{LAUNCHER_NAMES[flag]} (--{flag[2:]})" if flag in LAUNCHER_NAMES else flag


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in (*LAUNCHER_NAMES, "--dataloader_persistent_workers"):
        p.add_argument(flag, default=None)
    known, _ = p.parse_known_args(list(argv))
    return known


def _candidates(folder: Path) -> str:
    """What DATA could be instead: the data files and mixtures in `folder` (a few)."""
    try:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".yaml", ".yml", ".jsonl", ".json"))
        found += sorted(f"{p.name}/train.jsonl" for p in folder.iterdir() if (p / "train.jsonl").is_file())
    except OSError:
        return ""
    return f" ({folder} holds: {', '.join(found[:6])}{', ...' if len(found) > 6 else ''})" if found else ""


def data_problems(flag: str, value: str | None) -> list[str]:
    """A data file (.jsonl/.json) or mixture YAML that the dataset will be able to open, with its files."""
    if not value:
        return [f"{_name(flag)} is empty: set it to a converted mixture.yaml or a train.jsonl"] if flag == "--data_path" else []
    from llava_vla_plugin.core.training_data import parse_sources

    path = Path(value)
    fix = ("convert data first (python -m data_tools.convert --data-dir DATA_DIR --mixture NAME --out converted) "
           "or point it at a converted mixture.yaml or <dataset>/train.jsonl")
    if path.is_dir():
        inside = next((path / n for n in ("mixture.yaml", "train.jsonl") if (path / n).is_file()), None)
        hint = f"use {inside}" if inside else fix
        return [f"{_name(flag)} {value} is a folder, not a data file: {hint}"]
    if not path.exists():
        parent = path.parent
        return [f"{_name(flag)} {value}: no such file{_candidates(parent) if parent.is_dir() else ''}; {fix}"]
    if path.suffix not in (".yaml", ".yml", ".jsonl", ".json"):
        return [f"{_name(flag)} {value}: not a data file (use a .jsonl/.json sample file or a mixture .yaml)"]
    try:
        sources = parse_sources(value)
    except (OSError, ValueError) as e:
        return [f"{_name(flag)}: {e}"]
    missing = [str(s.path) for s in sources if not s.path.is_file()]
    if missing:
        return [f"{_name(flag)} {value} lists data files that do not exist: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}; convert those datasets into the folder the mixture names, "
                "or fix its json_path entries"]
    return []


def action_problems(args: argparse.Namespace) -> list[str]:
    """The action representation, horizon and window mode, as the registry (action_repr.py) checks them."""
    found = []
    horizon = args.vla_horizon if args.vla_horizon is not None else "1"
    try:
        h = int(horizon)
    except ValueError:
        found.append(f"{_name('--vla_horizon')} {horizon!r} is not an integer (the chunk length H, e.g. 1 or 8)")
        h = None
    from llava_vla_plugin.core.representations import (REPRESENTATIONS, ActionReprConfig, ActionReprError, parse_options,
                                                       representation_class)

    name = args.vla_action_repr if args.vla_action_repr is not None else "bins"
    mode = args.vla_window_mode if args.vla_window_mode is not None else "oft"
    try:
        options = parse_options(args.vla_repr_options or "")
    except ActionReprError as e:
        return found + [f"{_name('--vla_repr_options')}: {e}"]
    try:  # the registry's own checks (a horizon that is not a number: checked as H = 1 for the rest)
        config = ActionReprConfig(name=name, horizon=1 if h is None else h, window_mode=mode, options=options)
    except ActionReprError as e:
        which = ("--vla_action_repr" if name not in REPRESENTATIONS else
                 "--vla_window_mode" if "window mode" in str(e) else "--vla_horizon")
        found.append(f"{_name(which)}: {e}")
        return found
    try:  # the class's own options (fast: the FAST tokenizer, fitted for this H and D)
        representation_class(name).check_options(config)
    except ActionReprError as e:
        found.append(f"{_name('--vla_action_repr')} {name}: {e}")
    return found


def _bool(value: str | None) -> bool | None:
    """transformers' HfArgumentParser reading of a bool flag (string_to_bool); None: not a bool."""
    if value is None:
        return False
    v = str(value).lower()
    return True if v in ("yes", "true", "t", "y", "1") else False if v in ("no", "false", "f", "n", "0") else None


def image_aug_problems(args: argparse.Namespace) -> list[str]:
    """--vla_image_aug: a bool, and not with persistent data-loader workers (they would keep epoch 0's
    augmentation parameters; the trainer refuses the same, trainer.AugmentEpochCallback says why)."""
    aug = _bool(args.vla_image_aug)
    if aug is None:
        return [f"{_name('--vla_image_aug')} {args.vla_image_aug!r}: expected True or False (launcher: IMAGE_AUG=0 or 1)"]
    if aug and _bool(args.dataloader_persistent_workers):
        return [f"{_name('--vla_image_aug')} True with --dataloader_persistent_workers True: persistent workers keep "
                "epoch 0's augmentation parameters for every epoch; pass --dataloader_persistent_workers False"]
    return []


def remix_problems(args: argparse.Namespace) -> list[str]:
    """--vla_remix_reference (train/remix.py): a finished run's folder (a VLA checkpoint) and one batch per update
    (no gradient accumulation). The trainer checks the same again, and then that the
    reference's representation, tokens and statistics are this run's."""
    ref = args.vla_remix_reference
    if not ref:
        return []
    from llava_vla_plugin.core import checkpoint

    found = []
    if not Path(ref).is_dir():
        found.append(f"{_name('--vla_remix_reference')} {ref}: no such folder; set it to the OUTPUT_DIR of a finished "
                     "reference run trained on the same DATA")
    elif checkpoint.missing_files(ref):
        found.append(f"{_name('--vla_remix_reference')} {ref} lacks {', '.join(checkpoint.missing_files(ref))}: not a "
                     "finished run (train the reference to the end first, or point at one of its checkpoint-N folders)")
    if args.gradient_accumulation_steps not in (None, "1"):
        found.append(f"{_name('--gradient_accumulation_steps')} {args.gradient_accumulation_steps} with "
                     f"{_name('--vla_remix_reference')}: Re-Mix updates the dataset weights once per batch; set GRAD_ACCUM=1 "
                     "and raise BATCH_SIZE or NUM_GPUS")
    return found


def input_problems(args: argparse.Namespace) -> list[str]:
    """--vla_cameras (known views, the primary first) and --vla_proprio (a bool); the dataset checks the data has them."""
    from llava_vla_plugin.core.inputs import InputConfigError, parse_cameras

    found = []
    if args.vla_cameras is not None:
        try:
            parse_cameras(args.vla_cameras)
        except InputConfigError as e:
            found.append(f"{_name('--vla_cameras')}: {e}")
    if args.vla_proprio is not None and _bool(args.vla_proprio) is None:
        found.append(f"{_name('--vla_proprio')} {args.vla_proprio!r}: expected True or False (launcher: PROPRIO=0 or 1)")
    return found


def problems(argv: Sequence[str]) -> list[str]:
    """Every problem found, one line each (empty: the launch may go on)."""
    args = parse(argv)
    found = data_problems("--data_path", args.data_path) + data_problems("--vla_val_data", args.vla_val_data)
    if args.image_folder and not Path(args.image_folder).is_dir():
        found.append(f"{_name('--image_folder')} {args.image_folder}: no such folder; set it to the folder the "
                     "samples' image paths are relative to (the convert --out folder, e.g. converted)")
    found += action_problems(args)
    found += image_aug_problems(args)
    found += remix_problems(args)
    found += input_problems(args)
    model = args.model_name_or_path
    if model and not os.path.exists(model) and (model.startswith(("/", "./", "../", "~")) or model.count("/") > 1):
        found.append(f"{_name('--model_name_or_path')} {model}: no such folder (and not a hub id such as "
                     "lmms-lab/llava-onevision-qwen2-0.5b-ov)")
    if args.vla_resume not in (None, "auto"):
        from llava_vla_plugin.core.run_config import resolve_resume

        try:
            resolve_resume(args.vla_resume, args.output_dir or ".")
        except ValueError as e:
            found.append(str(e))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    found = problems(sys.argv[1:] if argv is None else argv)
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if found:
        print("error: nothing was started or written (checked before loading the model)", file=sys.stderr)
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())
