"""What a policy sees besides the instruction: its camera views and the robot state (proprio). The one owner of
the `vla_inputs.json` checkpoint file and of how those inputs enter the prompt (issue 22 item 2).

    vla_inputs.json   {"cameras": ["primary", "wrist"], "proprio": true, "proprio_dim": 8}

Training options: the launcher's CAMERAS=primary,wrist and PROPRIO=1 (trainer --vla_cameras, --vla_proprio). A
checkpoint without the file (every checkpoint before it existed) sees the primary camera and no state.

Views enter as OneVision's native multi-image input: one `<image>` placeholder per view, in CAMERA_ORDER, each
followed by a newline, exactly what upstream's tokenization of "<image>\\n<image>\\n{prompt}" gives. Upstream
encodes every image of a multi-image sample as ONE 384x384 tile ("pad", llava/train/train.py:1148-1152, which the
training dataset and the policy both follow), so a multi-view run takes 730 visual tokens per view whatever its
IMAGE_ASPECT_RATIO; a single-view run keeps its aspect ratio as before.

A missing camera follows OpenVLA's rule (prismatic/vla/datasets/rlds/dataset.py, restructure: an image key of None
becomes "" padding, decoded to an all-zero image): a dataset without a wrist view trains on a black wrist image,
counted and logged by the dataset. At inference a checkpoint that expects a view or the state refuses a request
without it (MissingInputError, naming it): nothing is zero-filled there.

The state enters as text, pi0-FAST's way (openpi src/openpi/models/tokenizer.py, FASTTokenizer.tokenize: "state
gets discretized into 256 discrete bins (assumed range after normalization: [-1, 1])" with
np.digitize(state, np.linspace(-1, 1, 257)[:-1]) - 1, written as space-separated integers "State: 12 200 ...;"). The
raw state is first normalized with the dataset's `proprio` statistics by OpenVLA's BOUNDS_Q99 map (the actions'
map, data_tools/normalize.py; OpenVLA's normalize_action_and_proprio applies the same to both); the text goes after
the instruction in the user turn: "...?\nState: 12 200 ...;". Why text and not OFT's projector: plain upstream loads
and trains the checkpoint unchanged (no head file; LoRA, merge and resume carry nothing new). Why digits and not the
action tokens: a pretrained LM already orders number tokens, while the 256 added action tokens all start as the
vocabulary's mean embedding and would first have to be told apart (measured on the tiny model: with action-bin
tokens the state was not learned in 60 steps, with digits it is). Cost: Qwen2 writes a number digit by digit, so
about 4 tokens per dimension (~32 for LIBERO's 8-d state), against 730 per view.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from data_tools.atomic import write_json
from data_tools.converted_format import PROPRIO_SOURCE_STATE, proprio_padding, proprio_source
from data_tools.normalize import normalize_bounds_q99

INPUTS_FILE = "vla_inputs.json"
CAMERA_ORDER = ("primary", "wrist")  # the views a run can train on, in the order their placeholders appear
DEFAULT_CAMERAS = ("primary",)
N_STATE_BINS = 256  # openpi FASTTokenizer: 256 bins over [-1, 1]


class InputConfigError(ValueError):
    """An input option that cannot work; the message says which value and what to set."""


class MissingInputError(ValueError):
    """A request without a view or the state the checkpoint was trained on."""


def parse_cameras(text: str | Sequence[str]) -> tuple[str, ...]:
    """"primary,wrist" -> ("primary", "wrist") in CAMERA_ORDER; the primary view is required."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if str(n).strip()]
    unknown = [n for n in names if n not in CAMERA_ORDER]
    if unknown or not names:
        raise InputConfigError(f"CAMERAS={','.join(names)!s}: unknown view(s) {unknown}; choose from {', '.join(CAMERA_ORDER)} "
                               "(comma-separated, e.g. primary,wrist)")
    if "primary" not in names:
        raise InputConfigError(f"CAMERAS={','.join(names)}: the primary (third-person) view is required")
    if len(set(names)) != len(names):
        raise InputConfigError(f"CAMERAS={','.join(names)}: a view is listed twice")
    return tuple(n for n in CAMERA_ORDER if n in names)


@dataclass(frozen=True)
class InputConfig:
    cameras: tuple[str, ...] = DEFAULT_CAMERAS
    proprio: bool = False
    proprio_dim: Optional[int] = None  # known once the data is read (the state's width)

    @property
    def n_views(self) -> int:
        return len(self.cameras)

    @property
    def wrist(self) -> bool:
        return "wrist" in self.cameras

    @property
    def is_default(self) -> bool:
        return self.cameras == DEFAULT_CAMERAS and not self.proprio

    @classmethod
    def from_args(cls, data_args: Any) -> "InputConfig":
        return cls(parse_cameras(getattr(data_args, "vla_cameras", "primary") or "primary"),
                   bool(getattr(data_args, "vla_proprio", False)))

    def with_proprio_dim(self, dim: int) -> "InputConfig":
        return InputConfig(self.cameras, self.proprio, int(dim))

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / INPUTS_FILE
        write_json(path, {"cameras": list(self.cameras), "proprio": self.proprio, "proprio_dim": self.proprio_dim})
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "InputConfig":
        path = Path(directory) / INPUTS_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            return cls(parse_cameras(data["cameras"]), bool(data["proprio"]), data.get("proprio_dim"))
        except (ValueError, KeyError, TypeError) as e:
            raise InputConfigError(f"{path}: not a valid {INPUTS_FILE} ({e}); copy it from the run's OUTPUT_DIR") from None

    def describe(self) -> str:
        state = f", proprio ({self.proprio_dim}-d)" if self.proprio else ""
        return "+".join(self.cameras) + state


def proprio_statistics(statistics: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    """The `proprio` entry of one dataset's statistics, refused (InputConfigError) when it was computed over zeros
    (OpenVLA without proprio; data_tools' `source` field says which): normalizing a real state with it would be wrong."""
    entry = (statistics.get(key) or {}).get("proprio")
    if not isinstance(entry, Mapping) or "q01" not in entry:
        raise InputConfigError(f"{where}: dataset {key!r} has no proprio statistics; reconvert it with this version "
                               "(data_tools.convert keeps the state) or train without PROPRIO=1")
    if proprio_source(entry) != PROPRIO_SOURCE_STATE:
        raise InputConfigError(f"{where}: the proprio statistics of {key!r} were computed over zeros (OpenVLA's file "
                               "without proprio), not over the robot state: reconvert the dataset with this version "
                               "of data_tools.convert, or train without PROPRIO=1")
    return entry


def with_padding(state: np.ndarray, stats_entry: Mapping[str, Any]) -> np.ndarray:
    """The state in the training layout. A state that lacks exactly the dataset's padding columns (OpenVLA's zero
    column for a None state_obs_key: LIBERO's layout is [EEF_state 6, None, gripper_state 2] = 9 values, and
    vla-eval's LIBERO sends the 8 real ones) gets the zeros back at those positions, as training had them."""
    width, padding = len(stats_entry["q01"]), proprio_padding(stats_entry)
    if len(state) == width:
        return state
    if padding and len(state) == width - len(padding):
        full = np.zeros(width, dtype=state.dtype)
        full[[i for i in range(width) if i not in set(padding)]] = state
        return full
    pad = f" (or {width - len(padding)} without the padding columns {list(padding)})" if padding else ""
    raise ValueError(f"the state has {len(state)} values; the checkpoint's proprio statistics have {width}{pad}")


def discretize_state(raw_state: Sequence[float] | np.ndarray, stats_entry: Mapping[str, Any]) -> np.ndarray:
    """Raw state -> normalized (BOUNDS_Q99, clipped to [-1, 1]) -> bin 0..255 per dimension (openpi's rule)."""
    x = np.asarray(raw_state, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"the state has non-finite values: {x.tolist()}")
    x = with_padding(x, stats_entry)
    normalized = normalize_bounds_q99(x, stats_entry)
    return np.digitize(normalized, bins=np.linspace(-1, 1, N_STATE_BINS + 1)[:-1]) - 1


def state_text(bins: Sequence[int] | np.ndarray) -> str:
    """The state's text in the user turn, after the instruction (openpi's "State: {state_str};")."""
    return "\nState: " + " ".join(str(int(b)) for b in bins) + ";"
