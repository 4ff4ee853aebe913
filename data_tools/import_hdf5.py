"""robomimic / LIBERO HDF5 demonstrations -> the converted format (read with h5py).

    vla-import hdf5 FILE_OR_FOLDER --name NAME --out converted/ [--preset libero|robomimic] [--mapping m.yaml]
                    [--instruction "..."]

The layout robomimic defines and LIBERO keeps: `data/demo_<i>/actions` [T, 7], `data/demo_<i>/obs/<key>`
(images [T, H, W, 3] uint8, low-dim state), `data.attrs["env_args"]` (JSON: env_name, env_kwargs). LIBERO adds
`data.attrs["problem_info"]` (JSON with "language_instruction"); robomimic files carry no language, so the
instruction comes from `--instruction` (or `instruction: {text: ...}` in the mapping). Demos are read in
numeric order (demo_2 before demo_10), files in name order when a folder is given; an episode's number is its
position in that order.

Presets (the mapping's defaults; a mapping YAML overrides any key):
- libero: primary view `agentview_rgb`, state `ee_states`;
  orientation rotate_180 (LIBERO renders upside down; OpenVLA flips it, see byod_mapping.orient); convention
  delta_eef with the gripper -1 = open, +1 = closed (LIBERO's OSC controller commands; OpenVLA's
  libero_dataset_transform clips to [0, 1] and inverts), instruction from problem_info.
- robomimic: primary view `agentview_image`, state `robot0_eef_pos`, orientation none, convention delta_eef
  with the gripper -1 = open, +1 = closed (robosuite's gripper command), instruction from --instruction.

A demo without `actions` (or without the primary view) is skipped, counted under dropped_episodes and listed
in the manifest; a demo whose arrays disagree in length is an error naming the file, demo and key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.byod import EpisodeData, EpisodeSkipped, ImportInputError, _files_digest, finish_actions, pixels_to_jpeg
from data_tools.byod_mapping import ActionConvention, ImportMapping

PRESETS = {
    "libero": ImportMapping(views={"primary": "agentview_rgb"}, state="ee_states", action_key="actions",
                            instruction="problem_info", orientation="rotate_180",
                            convention=ActionConvention("delta_eef", gripper_open=-1.0, gripper_closed=1.0)),
    "robomimic": ImportMapping(views={"primary": "agentview_image"}, state="robot0_eef_pos", action_key="actions",
                               instruction=None, orientation="none",
                               convention=ActionConvention("delta_eef", gripper_open=-1.0, gripper_closed=1.0)),
}


def _demo_number(name: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


@dataclass(frozen=True)
class DemoRef:
    position: int
    file: str
    demo: str

    def __str__(self) -> str:
        return f"{self.file}: data/{self.demo}"


def _attr_json(attrs: Any, key: str) -> dict[str, Any]:
    raw = attrs.get(key)
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    try:
        doc = json.loads(raw) if isinstance(raw, str) else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def file_instruction(attrs: Any) -> str | None:
    """The language of a file: LIBERO's problem_info.language_instruction, else env_args' env_kwargs
    (`language_instruction` / `lang`), else None."""
    info = _attr_json(attrs, "problem_info")
    if isinstance(info.get("language_instruction"), str) and info["language_instruction"].strip():
        return info["language_instruction"]
    kwargs = _attr_json(attrs, "env_args").get("env_kwargs") or {}
    for k in ("language_instruction", "lang", "language"):
        if isinstance(kwargs.get(k), str) and kwargs[k].strip():
            return kwargs[k]
    return None


@dataclass
class Hdf5Source:
    """One HDF5 file or a folder of them (*.hdf5, *.h5)."""

    path: Path
    mapping: ImportMapping
    preset: str = "libero"
    kind: str = "hdf5"
    files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path).resolve()
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.iterdir() if p.suffix in (".hdf5", ".h5"))
        elif self.path.is_file():
            self.files = [self.path]
        if not self.files:
            raise ImportInputError(f"{self.path}: no .hdf5 / .h5 file")

    def describe(self) -> dict[str, Any]:
        return {"kind": "hdf5", "path": str(self.path), "preset": self.preset, "files": [p.name for p in self.files],
                "primary_view": self.mapping.primary, "orientation": self.mapping.orientation,
                "views_not_exported": sorted(v for r, v in self.mapping.views.items() if r != "primary"),
                "images": {"reencoded": True, "from": "raw pixels in the HDF5 file",
                           "jpeg_quality": self.mapping.jpeg_quality}}

    def digest(self) -> str:
        root = self.path if self.path.is_dir() else self.path.parent
        return _files_digest(self.files, root)

    def refs(self) -> list[DemoRef]:
        import h5py

        refs = []
        for f in self.files:
            try:
                with h5py.File(f, "r") as h:
                    if "data" not in h:
                        raise ImportInputError(f"{f}: no `data` group (robomimic/LIBERO layout: data/demo_<i>/...)")
                    demos = sorted((k for k in h["data"].keys() if k.startswith("demo")), key=_demo_number)
            except OSError as e:
                raise ImportInputError(f"{f}: cannot open as HDF5 ({e})") from None
            base = len(refs)
            refs.extend([DemoRef(base + i, str(f), d) for i, d in enumerate(demos)])
        return refs

    def load(self, ref: DemoRef) -> EpisodeData:
        import h5py

        m = self.mapping
        where = f"{ref.file}: data/{ref.demo}"
        with h5py.File(ref.file, "r") as h:
            demo = h["data"][ref.demo]
            if m.action_key not in demo:
                raise EpisodeSkipped("no_actions", where, f"no {m.action_key!r} dataset (keys: {sorted(demo.keys())})")
            obs = demo.get("obs")
            key = m.primary
            if obs is None or key not in obs:
                raise EpisodeSkipped("no_primary_view", where, f"no obs/{key} (obs keys: "
                                     f"{sorted(obs.keys()) if obs is not None else 'no obs group'})")
            instruction = m.instruction_text
            if instruction is None and m.instruction:
                instruction = file_instruction(h["data"].attrs)
            if not instruction or not str(instruction).strip():
                raise EpisodeSkipped("no_instruction", where, "no language in problem_info/env_args; pass --instruction")
            actions = finish_actions(demo[m.action_key][()], m, f"{where}: key {m.action_key!r}")
            images = obs[key]
            if len(images) != len(actions):
                raise ImportInputError(f"{where}: key 'obs/{key}' has {len(images)} frames, {m.action_key!r} "
                                       f"{len(actions)} rows")
            frames = [pixels_to_jpeg(images[t], m) for t in range(len(images))]
            state = None
            if m.state and m.state in obs:
                state = np.asarray(obs[m.state][()], np.float32).reshape(len(actions), -1)
        return EpisodeData(ref.position, frames, actions, str(instruction), where, state=state, image_how="encoded")


def make_mapping(preset: str, base: ImportMapping | None = None, instruction: str | None = None) -> ImportMapping:
    if preset not in PRESETS:
        raise ImportInputError(f"--preset {preset!r}: use one of {', '.join(PRESETS)}")
    m = base or PRESETS[preset]
    return replace(m, instruction_text=instruction) if instruction else m
