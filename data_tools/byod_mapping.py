"""How a bring-your-own-data source maps onto the converted format: the YAML mapping and the action convention.

A mapping says which of the source's keys are the camera views, the proprio state, the action and the
instruction, how the images are oriented, and what the actions *mean* (the action convention). Every key has
a default per source format, so a mapping file is only needed where a dataset differs::

    # mapping.yaml (every key optional)
    views: {primary: observation.images.front}   # the exported camera; other views are listed, not exported
    state: observation.state                     # proprio: kept per episode in <split>_proprio.npz
    action: {key: action, indices: [0, 1, 2, 3, 4, 5, 6]}   # 7 dims: 6 end-effector + gripper
    instruction: task                            # LeRobot: the episode's task string; HDF5: see import_hdf5
    orientation: none                            # none | flip_vertical | flip_horizontal | rotate_180
    jpeg_quality: 95                             # decoded video / raw pixels are stored as JPEG at this quality
    convention:
      type: delta_eef                            # delta_eef | absolute_eef
      gripper_open: 1.0                          # the value that means "open"
      gripper_closed: 0.0                        # the value that means "closed"
      to_openvla_gripper: false                  # true: map the gripper linearly onto OpenVLA's (1 open, 0 closed)

Why the convention is declared and not guessed: a 7-d action vector does not say whether it is a delta or a
pose, or which gripper value is open. OpenVLA's pipeline (the converted RLDS data) is delta end effector with
the gripper in [0, 1], 1 = open (docs/DESIGN.md 5); a dataset recorded otherwise trains a policy on
contradictory targets when mixed with it. The importer records the declared convention in manifest.json
(`action_convention`), and `vla-mixture` refuses to mix datasets whose conventions differ unless told to.
Typed dataclasses, parsed once; the importers never read the YAML themselves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

ACTION_DIM = 7  # the converted format's action: 6 end-effector dims + gripper (converted_format, docs/DESIGN.md 2.1)
CONVENTION_TYPES = ("delta_eef", "absolute_eef")
ORIENTATIONS = ("none", "flip_vertical", "flip_horizontal", "rotate_180")


class MappingError(ValueError):
    """A mapping file or option that cannot be used; the message names the key and what to write."""


@dataclass(frozen=True)
class ActionConvention:
    """What the 7 action numbers mean. Equality is what `vla-mixture` compares."""

    type: str = "delta_eef"
    gripper_open: float = 1.0
    gripper_closed: float = 0.0

    def describe(self) -> str:
        name = " (OpenVLA's)" if self == OPENVLA_CONVENTION else ""
        return f"{self.type}, gripper open={self.gripper_open:g} closed={self.gripper_closed:g}{name}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ActionConvention":
        """A manifest's `action_convention` (absent: data converted from RLDS, which is OpenVLA's)."""
        if not d:
            return OPENVLA_CONVENTION
        return cls(str(d.get("type", "delta_eef")), float(d.get("gripper_open", 1.0)), float(d.get("gripper_closed", 0.0)))


# What data_tools.convert's RLDS output is: OpenVLA's standardized EEF_POS actions.
OPENVLA_CONVENTION = ActionConvention("delta_eef", 1.0, 0.0)


@dataclass(frozen=True)
class ImportMapping:
    """Source keys -> the converted format, plus the declared action convention."""

    views: dict[str, str] = field(default_factory=dict)  # role -> source key; "primary" is exported
    state: str | None = None
    action_key: str = "action"
    action_indices: tuple[int, ...] | None = None
    instruction: str | None = None  # a source key, or (HDF5/API) the instruction itself via `instruction_text`
    instruction_text: str | None = None  # one instruction for every episode (overrides what the source says)
    orientation: str = "none"
    jpeg_quality: int = 95
    convention: ActionConvention = OPENVLA_CONVENTION
    to_openvla_gripper: bool = False

    @property
    def primary(self) -> str | None:
        return self.views.get("primary")

    def recorded_convention(self) -> ActionConvention:
        """The convention of the actions as written: OpenVLA's gripper after `to_openvla_gripper`."""
        if self.to_openvla_gripper:
            return ActionConvention(self.convention.type, OPENVLA_CONVENTION.gripper_open, OPENVLA_CONVENTION.gripper_closed)
        return self.convention

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["action_indices"] = list(self.action_indices) if self.action_indices is not None else None
        return d


def orient(pixels, orientation: str):
    """The image as the policy should see it. LIBERO's simulator renders upside down: OpenVLA rotates its images
    by 180 degrees (`img[::-1, ::-1]`) in its LIBERO HDF5 -> RLDS conversion (openvla/openvla
    experiments/robot/libero/regenerate_libero_dataset.py, module docstring: "we rotate the images by 180 degrees
    because we observe that the environments return images that are upside down") and again at evaluation
    (experiments/robot/libero/libero_utils.py get_libero_image: `img = img[::-1, ::-1]  # IMPORTANT: rotate 180
    degrees to match train preprocessing`; OpenVLA-OFT, moojink/openvla-oft, keeps both). So LIBERO HDF5 imports
    default to rotate_180, and a policy trained on them is served rotated frames, as OpenVLA's."""
    if orientation == "none":
        return pixels
    if orientation == "flip_vertical":
        return pixels[::-1]
    if orientation == "flip_horizontal":
        return pixels[:, ::-1]
    if orientation == "rotate_180":
        return pixels[::-1, ::-1]
    raise MappingError(f"orientation {orientation!r}: use one of {', '.join(ORIENTATIONS)}")


def map_gripper(actions, convention: ActionConvention):
    """OpenVLA's gripper (1 open, 0 closed) from the declared one, linearly: open -> 1, closed -> 0.
    For LIBERO's -1 open / +1 closed this equals OpenVLA's libero transform (clip to [0, 1], then 1 - x) on its
    binary commands. Returns a new array; the 6 end-effector dims are untouched."""
    import numpy as np

    out = np.array(actions, dtype=np.float32, copy=True)
    span = convention.gripper_open - convention.gripper_closed
    out[:, -1] = (out[:, -1] - convention.gripper_closed) / span
    return out


_KNOWN = {"views", "state", "action", "instruction", "orientation", "jpeg_quality", "convention"}


def _convention(doc: Any, where: str) -> tuple[ActionConvention, bool]:
    if doc is None:
        return OPENVLA_CONVENTION, False
    if not isinstance(doc, Mapping):
        raise MappingError(f"{where}: `convention` must be a mapping {{type, gripper_open, gripper_closed, to_openvla_gripper}}")
    unknown = set(doc) - {"type", "gripper_open", "gripper_closed", "to_openvla_gripper"}
    if unknown:
        raise MappingError(f"{where}: unknown convention keys {sorted(unknown)}")
    ctype = str(doc.get("type", "delta_eef"))
    if ctype not in CONVENTION_TYPES:
        raise MappingError(f"{where}: convention.type {ctype!r}: use one of {', '.join(CONVENTION_TYPES)}")
    try:
        g_open, g_closed = float(doc.get("gripper_open", 1.0)), float(doc.get("gripper_closed", 0.0))
    except (TypeError, ValueError) as e:
        raise MappingError(f"{where}: convention.gripper_open / gripper_closed must be numbers ({e})") from None
    if not (math.isfinite(g_open) and math.isfinite(g_closed)) or g_open == g_closed:
        raise MappingError(f"{where}: convention.gripper_open and gripper_closed must be two different finite numbers")
    return ActionConvention(ctype, g_open, g_closed), bool(doc.get("to_openvla_gripper", False))


def parse_mapping(doc: Mapping[str, Any] | None, defaults: ImportMapping, where: str = "mapping") -> ImportMapping:
    """A mapping document (parsed YAML) over a source format's defaults; MappingError names the bad key."""
    doc = dict(doc or {})
    unknown = set(doc) - _KNOWN
    if unknown:
        raise MappingError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_KNOWN)}")
    m = defaults
    if "views" in doc:
        views = doc["views"]
        if isinstance(views, str):
            views = {"primary": views}
        if not isinstance(views, Mapping) or "primary" not in views:
            raise MappingError(f"{where}: `views` must map roles to source keys and name the `primary` camera")
        m = replace(m, views={str(k): str(v) for k, v in views.items()})
    if "state" in doc:
        m = replace(m, state=None if doc["state"] in (None, "", False) else str(doc["state"]))
    if "action" in doc:
        a = doc["action"]
        if isinstance(a, str):
            a = {"key": a}
        if not isinstance(a, Mapping):
            raise MappingError(f"{where}: `action` must be a key or {{key, indices}}")
        idx = a.get("indices")
        if idx is not None:
            if not (isinstance(idx, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in idx)):
                raise MappingError(f"{where}: action.indices must be a list of integers")
            if len(idx) != ACTION_DIM:
                raise MappingError(f"{where}: action.indices picks {len(idx)} dims; the converted format needs "
                                   f"{ACTION_DIM} (6 end effector + gripper)")
            idx = tuple(idx)
        m = replace(m, action_key=str(a.get("key", m.action_key)), action_indices=idx)
    if "instruction" in doc:
        ins = doc["instruction"]
        if isinstance(ins, Mapping):
            m = replace(m, instruction=ins.get("key", m.instruction), instruction_text=ins.get("text"))
        else:
            m = replace(m, instruction=None if ins is None else str(ins))
    if "orientation" in doc:
        if doc["orientation"] not in ORIENTATIONS:
            raise MappingError(f"{where}: orientation {doc['orientation']!r}: use one of {', '.join(ORIENTATIONS)}")
        m = replace(m, orientation=str(doc["orientation"]))
    if "jpeg_quality" in doc:
        q = doc["jpeg_quality"]
        if not (isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= 100):
            raise MappingError(f"{where}: jpeg_quality must be an integer 1-100, got {q!r}")
        m = replace(m, jpeg_quality=q)
    if "convention" in doc:
        conv, to_openvla = _convention(doc["convention"], where)
        m = replace(m, convention=conv, to_openvla_gripper=to_openvla)
    return m


def load_mapping(path: str | Path | None, defaults: ImportMapping) -> ImportMapping:
    """The mapping YAML at `path` over `defaults` (no path: the defaults)."""
    if path is None:
        return defaults
    path = Path(path)
    if not path.is_file():
        raise MappingError(f"--mapping {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MappingError(f"{path}: not valid YAML: {e}") from None
    if doc is not None and not isinstance(doc, Mapping):
        raise MappingError(f"{path}: expected a mapping of keys (views, state, action, instruction, ...)")
    return parse_mapping(doc, defaults, str(path))
