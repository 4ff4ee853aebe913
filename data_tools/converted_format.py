"""The converted-data format: the one owner of what `data_tools.convert` writes and everything else reads.

Layout of a converted directory OUT (docs/DESIGN.md, "The converted format")::

    OUT/mixture.yaml                     upstream's --data_path file: {datasets: [{json_path, weight, ...}]}
    OUT/dataset_statistics.json          {dataset: statistics} of every dataset (OpenVLA's format)
    OUT/<dataset>/train.jsonl, val.jsonl one ConvertedSample per line
    OUT/<dataset>/dataset_statistics.json {dataset: statistics}
    OUT/<dataset>/manifest.json          what was read, options, counts of everything dropped
    OUT/<dataset>/images/<split>/<episode:06d>/<step:04d>.jpg        primary camera (OpenVLA image_obs_keys "primary")
    OUT/<dataset>/images_wrist/<split>/<episode:06d>/<step:04d>.jpg  wrist camera, only where the dataset has one
    OUT/<dataset>/<split>_actions.npz    every kept episode's normalized action sequence (EpisodeActions)
    OUT/<dataset>/<split>_proprio.npz    the same episodes' raw proprio (EpisodeActions layout), where the
                                         registry names state_obs_keys that the source has

A sample line is LLaVA's conversation format plus provenance and the raw action::

    {"id": "<dataset>/<split>/<episode:06d>/<step:04d>", "image": "<dataset>/images/...jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat action should the robot take to <instr>?"},
                       {"from": "gpt", "value": [7 normalized floats]}],
     "dataset": ..., "split": ..., "episode": int, "step": int, "action_raw": [7 floats],
     "instruction": "<the dataset's instruction, original case>",
     "image_wrist": "<dataset>/images_wrist/...jpg"}      <- only when this frame has a wrist image

Views (OpenVLA make_dataset_from_rlds, prismatic/vla/datasets/rlds/dataset.py:145-149): a camera whose
registry key is None is an empty-string padding image, which decode_and_resize turns into a zero image
(obs_transforms.py:67-69) and add_pad_mask_dict marks as padding (traj_transforms.py:95-96); a step whose
stored bytes are empty is the same. We write no file for
it: `image_wrist` is absent on that line (`sample_wrist_image` returns None) and the reader applies the
zero-image rule; manifest.json counts it under views.wrist.missing. Every stored frame is the source's JPEG
bytes unchanged (unresized), as the primary frames.

Proprio (dataset.py:157-168): the state_obs_keys of the registry, after the standardization transform,
cast to float32 and concatenated, one zero column for each None key. Statistics: dataset_statistics.json's
`proprio` entry has OpenVLA's numeric fields plus `source` (`proprio_source`): "state" when computed over
that proprio (OpenVLA get_dataset_statistics with load_proprio=True), "zeros" when over zeros shaped like
the actions (OpenVLA with load_proprio=False, data_utils.py:222-224); files written before the field
existed read as "unknown" (they are the zeros). With source "state" the entry also has `padding`
(`proprio_padding`): the state columns that are OpenVLA's zero column for a None key, e.g. [6] for LIBERO
([EEF_state, None, gripper_state]: 6 + 1 + 2 = 9 values) whose benchmark sends the 8 real ones; a reader
given a state without those columns puts the zeros back where training had them.

Data converted before views/proprio existed has no images_wrist/, no <split>_proprio.npz and no `source`:
every accessor here returns None / "unknown" for it and it trains as a primary-only run.

The human turn is what upstream LLaVA-NeXT reads, so the files also train with plain upstream; the
`instruction` field is what our own readers use (no parsing the prompt back). Data converted before
the field existed has no `instruction`: `sample_instruction` then recovers it from the human turn.
Pure Python + numpy: data_tools and llava_vla_plugin both import it (data_tools never imports the plugin).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# ---- file names ---------------------------------------------------------------------------------
SPLITS = ("train", "val")
STATISTICS_FILE = "dataset_statistics.json"
MANIFEST_FILE = "manifest.json"
MIXTURE_FILE = "mixture.yaml"
IMAGES_DIR = "images"
WRIST_IMAGES_DIR = "images_wrist"  # same relative layout as IMAGES_DIR
# dataset_statistics.json[<dataset>]["proprio"]["source"]
PROPRIO_SOURCE_STATE = "state"  # over the real proprio (OpenVLA with load_proprio=True)
PROPRIO_SOURCE_ZEROS = "zeros"  # over zeros shaped like the actions (OpenVLA with load_proprio=False)
PROPRIO_SOURCE_UNKNOWN = "unknown"  # no field: written by an older version, over zeros
PROPRIO_PADDING = "padding"  # dataset_statistics.json[<dataset>]["proprio"]["padding"]: OpenVLA's zero columns


def split_file(split: str) -> str:
    """`train.jsonl` / `val.jsonl`: one sample per line."""
    return f"{split}.jsonl"


TRAIN_FILE = split_file("train")
VAL_FILE = split_file("val")

# ---- prompt -------------------------------------------------------------------------------------
IMAGE_TOKEN = "<image>"  # upstream LLaVA's image placeholder in the human turn
IGNORE_INDEX = -100  # label of positions that carry no loss (upstream's and PyTorch's convention)
# OpenVLA's prompt (prismatic/vla/datasets/datasets.py RLDSBatchTransform); a checkpoint records the one it used.
PROMPT_TEMPLATE = "What action should the robot take to {instruction}?"


def prompt_text(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    """OpenVLA lowercases the instruction when it builds the prompt; so do we (the data keep the original)."""
    return template.format(instruction=instruction.lower())


def human_turn(instruction: str, template: str = PROMPT_TEMPLATE) -> str:
    return f"{IMAGE_TOKEN}\n{prompt_text(instruction, template)}"


class SampleFormatError(ValueError):
    """A sample that does not follow the converted format; the message says what is wrong."""


# ---- one sample ---------------------------------------------------------------------------------
def _f32_json(values: Sequence[float] | np.ndarray) -> str:
    """A JSON array of the shortest decimals that round-trip to the same float32 values."""
    return "[" + ", ".join(str(v) for v in np.asarray(values, dtype=np.float32)) + "]"


@dataclass(frozen=True)
class ConvertedSample:
    """One frame of one episode: what a line of train.jsonl / val.jsonl holds."""

    dataset: str
    split: str
    episode: int
    step: int
    instruction: str
    action: Any  # the normalized action ([-1, 1] where the mask says so), float32 values
    action_raw: Any  # the standardized action before normalization, float32 values
    image_wrist: str | None = None  # the wrist frame's path (wrist_image_path), None: no wrist image for this frame

    @property
    def id(self) -> str:
        return sample_id(self.dataset, self.split, self.episode, self.step)

    @property
    def image(self) -> str:
        return image_path(self.dataset, self.split, self.episode, self.step)

    def to_json_line(self, template: str = PROMPT_TEMPLATE) -> str:
        """The sample as one JSON line, formatted directly: json.dumps of the nested dict costs 3x more and
        the converter runs this once per frame. Parses to the same object as json.dumps of `to_dict()`."""
        human = json.dumps(human_turn(self.instruction, template), ensure_ascii=False)
        return (
            f'{{"id": "{self.id}", "image": "{self.image}", '
            f'"conversations": [{{"from": "human", "value": {human}}}, {{"from": "gpt", "value": {_f32_json(self.action)}}}], '
            f'"dataset": "{self.dataset}", "split": "{self.split}", "episode": {self.episode}, "step": {self.step}, '
            f'"action_raw": {_f32_json(self.action_raw)}, '
            f'"instruction": {json.dumps(self.instruction, ensure_ascii=False)}'
            + (f', "image_wrist": {json.dumps(self.image_wrist)}' if self.image_wrist is not None else "")
            + "}\n"
        )

    def to_dict(self, template: str = PROMPT_TEMPLATE) -> dict[str, Any]:
        return json.loads(self.to_json_line(template))

    @classmethod
    def from_dict(cls, sample: Mapping[str, Any], template: str = PROMPT_TEMPLATE) -> "ConvertedSample":
        """Read a sample line (new or old converted data); raises SampleFormatError naming the sample."""
        missing = [k for k in ("dataset", "split", "episode", "step", "conversations") if k not in sample]
        if missing or not is_action_sample(sample):
            raise SampleFormatError(f"sample {sample.get('id', '?')!r} is not a converted robot-action sample"
                                    + (f" (missing {missing})" if missing else ""))
        return cls(str(sample["dataset"]), str(sample["split"]), int(sample["episode"]), int(sample["step"]),
                   sample_instruction(sample, template), list(sample_action(sample)),
                   sample.get("action_raw"), sample_wrist_image(sample))


def sample_id(dataset: str, split: str, episode: int, step: int) -> str:
    return f"{dataset}/{split}/{episode:06d}/{step:04d}"


def image_relpath(split: str, episode: int, step: int) -> str:
    """The image path under <dataset>/images/."""
    return f"{split}/{episode:06d}/{step:04d}.jpg"


def image_path(dataset: str, split: str, episode: int, step: int) -> str:
    """The image path relative to the converted directory (upstream's --image_folder)."""
    return f"{dataset}/{IMAGES_DIR}/{image_relpath(split, episode, step)}"


def wrist_image_path(dataset: str, split: str, episode: int, step: int) -> str:
    """The wrist frame's path relative to the converted directory: image_path's layout under images_wrist/."""
    return f"{dataset}/{WRIST_IMAGES_DIR}/{image_relpath(split, episode, step)}"


def converted_dataset_dirs(out) -> list:
    """The finished datasets of a converted directory: the folders holding a manifest (written last)."""
    from pathlib import Path

    return sorted(p.parent for p in Path(out).glob(f"*/{MANIFEST_FILE}"))


# ---- predicates and accessors (plain dicts, as the loaders hold them) -----------------------------
def is_action_sample(sample: Mapping[str, Any]) -> bool:
    """A robot-action sample: its assistant turn is a list of numbers. Anything else (co-training
    instruction data) is upstream's business."""
    conv = sample.get("conversations") or []
    return len(conv) >= 2 and isinstance(conv[1], Mapping) and isinstance(conv[1].get("value"), list)


def sample_action(sample: Mapping[str, Any]) -> list:
    """The normalized action (the assistant turn) of a robot-action sample."""
    return sample["conversations"][1]["value"]


def sample_wrist_image(sample: Mapping[str, Any]) -> str | None:
    """The wrist frame's path (relative to the converted directory), or None: the dataset has no wrist camera,
    the frame's wrist image was empty in the source, or the data were converted before views existed. None
    means OpenVLA's padding rule: a zero image (dataset.py:147, decode_and_resize)."""
    path = sample.get("image_wrist")
    return path if isinstance(path, str) and path else None


def proprio_source(stats_entry: Mapping[str, Any]) -> str:
    """What a dataset's statistics' `proprio` entry was computed over: "state" (the real proprio), "zeros"
    (zeros shaped like the actions, OpenVLA without proprio) or "unknown" (no `source` field: written by an
    older version, which always wrote the zeros). `stats_entry` is one dataset's statistics or its `proprio`."""
    entry = stats_entry.get("proprio", stats_entry) if isinstance(stats_entry, Mapping) else {}
    source = entry.get("source") if isinstance(entry, Mapping) else None
    return source if source in (PROPRIO_SOURCE_STATE, PROPRIO_SOURCE_ZEROS) else PROPRIO_SOURCE_UNKNOWN


def padding_columns(columns: Sequence[Sequence[Any]]) -> list[int]:
    """The proprio's zero columns from its layout [[state_obs_key or None, width], ...] (manifest.json's
    proprio.columns): the positions of the None keys, OpenVLA's padding (dataset.py:157-168)."""
    out, pos = [], 0
    for key, width in columns:
        if key is None:
            out.extend(range(pos, pos + int(width)))
        pos += int(width)
    return out


def proprio_padding(stats_entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The zero columns of a dataset's proprio (`padding`; none when the field is absent: importers' data, or the
    statistics of a state without None keys). `stats_entry` is one dataset's statistics or its `proprio`."""
    entry = stats_entry.get("proprio", stats_entry) if isinstance(stats_entry, Mapping) else {}
    return tuple(int(i) for i in (entry.get(PROPRIO_PADDING) or ())) if isinstance(entry, Mapping) else ()


def sample_instruction(sample: Mapping[str, Any], template: str = PROMPT_TEMPLATE) -> str:
    """The instruction a sample's prompt is built from: its `instruction` field, else (data converted
    before the field existed, or hand-written samples) recovered from the human turn via `template`."""
    instruction = sample.get("instruction")
    if isinstance(instruction, str) and instruction:
        return instruction
    conv = sample.get("conversations") or [{}]
    human = str(conv[0].get("value", "")).replace(IMAGE_TOKEN, "").strip()
    head, _, tail = template.partition("{instruction}")
    if human.startswith(head) and human.endswith(tail) and len(human) >= len(head) + len(tail):
        return human[len(head): len(human) - len(tail) if tail else None]
    raise SampleFormatError(f"sample {sample.get('id', '?')!r}: human turn {human[:80]!r} does not follow the prompt "
                            f"template {template!r}; give the sample an `instruction` field")


# ---- per-episode action sequences (future-action windows are built from them at training time) ----
def episode_actions_file(split: str) -> str:
    """`train_actions.npz` / `val_actions.npz` beside the split's jsonl: every kept episode's full normalized
    action sequence, so the chunk length H is a training option and needs no re-conversion."""
    return f"{split}_actions.npz"


def episode_proprio_file(split: str) -> str:
    """`train_proprio.npz` / `val_proprio.npz`: every kept episode's proprio state (raw, not normalized), in
    the EpisodeActions layout, rows and steps aligned with `<split>_actions.npz` (same episodes, same steps).
    RLDS conversion writes OpenVLA's proprio (state_obs_keys concatenated, a zero column per None key:
    prismatic/vla/datasets/rlds/dataset.py:157-168) wherever the registry's state keys resolve in the source;
    the bring-your-own-data importers (data_tools/byod.py) write it when the source has a state. Absent in
    data converted before (and for datasets without state): readers treat it as optional."""
    return f"{split}_proprio.npz"


# OpenVLA's `absolute_action_mask` for ActionEncoding.EEF_POS (the only encoding converted): the gripper is an
# absolute command, the 6 end-effector deltas are relative (oxe/utils/... make_oxe_dataset_kwargs).
EEF_POS_ABSOLUTE_MASK = (False,) * 6 + (True,)


@dataclass(frozen=True)
class EpisodeActions:
    """The normalized action sequences of one dataset split, concatenated.

    `actions[offsets[e]:offsets[e+1]]` is episode `episodes[e]`'s standardized trajectory (every step the
    standardization kept, not only the exported frames), `steps` the raw step index of each row (a sample's
    `step`), `absolute_mask` which dimensions are absolute (repeated past the episode's end in OpenVLA's rule)."""

    actions: np.ndarray  # [N, D] float32, normalized
    steps: np.ndarray  # [N] int64
    episodes: np.ndarray  # [E] int64, the samples' `episode`
    offsets: np.ndarray  # [E + 1] int64
    absolute_mask: np.ndarray  # [D] bool

    def save(self, path) -> None:
        """An .npz (np.load reads it) written byte-identically for the same arrays: np.savez stamps each member
        with the current time, so the zip is written here with a fixed date. Written to a temp name, then
        renamed: a reader never sees half a file."""
        import io
        import os
        import zipfile

        arrays = {"actions": np.asarray(self.actions, np.float32), "steps": np.asarray(self.steps, np.int64),
                  "episodes": np.asarray(self.episodes, np.int64), "offsets": np.asarray(self.offsets, np.int64),
                  "absolute_mask": np.asarray(self.absolute_mask, bool)}
        tmp = f"{path}.tmp"
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arr, allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "EpisodeActions":
        with np.load(path) as z:
            return cls(z["actions"], z["steps"], z["episodes"], z["offsets"], z["absolute_mask"])

    @classmethod
    def from_episodes(cls, episodes: Mapping[int, tuple[np.ndarray, np.ndarray]], absolute_mask: Sequence[bool]) -> "EpisodeActions":
        """{episode: (normalized actions [T, D], raw step indices [T])} -> the concatenated form (episode order)."""
        keys = sorted(episodes)
        dim = len(absolute_mask)
        acts = [np.asarray(episodes[k][0], np.float32).reshape(-1, dim) for k in keys]
        steps = [np.asarray(episodes[k][1], np.int64) for k in keys]
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in acts])]).astype(np.int64)
        return cls(np.concatenate(acts) if acts else np.zeros((0, dim), np.float32),
                   np.concatenate(steps) if steps else np.zeros(0, np.int64),
                   np.asarray(keys, np.int64), offsets, np.asarray(absolute_mask, bool))

    def episode(self, episode: int) -> tuple[np.ndarray, np.ndarray]:
        """(actions [T, D], raw steps [T]) of one episode; KeyError when it is not in the file."""
        pos = int(np.searchsorted(self.episodes, episode))
        if pos >= len(self.episodes) or self.episodes[pos] != episode:
            raise KeyError(f"episode {episode} has no action sequence")
        lo, hi = int(self.offsets[pos]), int(self.offsets[pos + 1])
        return self.actions[lo:hi], self.steps[lo:hi]
