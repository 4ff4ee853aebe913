"""Pure numpy versions of OpenVLA's standardization transforms, one episode at a time.

Each function reproduces the TensorFlow op of the same name in
openvla prismatic/vla/datasets/rlds/utils/data_utils.py (or oxe/transforms.py) on arrays with a leading
time axis of T steps. Everything stays float32 because OpenVLA casts actions to tf.float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_tools.registry import ActionPart, DatasetSpec, EpisodeOp, PartOp

F32 = np.float32


def rel2abs_gripper_actions(actions: np.ndarray) -> np.ndarray:
    """Relative gripper commands (+1 close, -1 open, 0 keep) -> absolute (1 open, 0 closed).

    Like OpenVLA: the state before the first command is the opposite of that command; no command at all
    means open for the whole episode.
    """
    a = np.asarray(actions, dtype=F32).reshape(-1)
    if a.size == 0:
        return np.zeros((0,), F32)
    thresholded = np.where(a < -0.1, 1, np.where(a > 0.1, -1, 0)).astype(np.int32)
    nonzero = np.flatnonzero(thresholded != 0)
    start = -int(thresholded[nonzero[0]]) if nonzero.size else 0
    carry = 1 if start == 0 else start
    out = np.empty(a.shape, np.int32)
    for i, t in enumerate(thresholded):
        if t != 0:
            carry = int(t)
        out[i] = carry
    return (out.astype(F32) / F32(2) + F32(0.5)).astype(F32)


def invert_gripper_actions(actions: np.ndarray) -> np.ndarray:
    return (F32(1) - np.asarray(actions, dtype=F32)).astype(F32)


def binarize_gripper_actions(actions: np.ndarray) -> np.ndarray:
    """Continuous gripper -> {0, 1}; in-between values take the value reached after them (reverse scan).

    The scan starts from the raw last value, so a trailing run of in-between values keeps that raw value,
    exactly as OpenVLA's tf.scan(..., initializer=actions[-1], reverse=True).
    """
    a = np.asarray(actions, dtype=F32).reshape(-1)
    if a.size == 0:
        return np.zeros((0,), F32)
    open_mask, closed_mask = a > F32(0.95), a < F32(0.05)
    in_between = ~(open_mask | closed_mask)
    out = np.empty(a.shape, F32)
    carry = a[-1]
    for i in range(a.size - 1, -1, -1):
        if not in_between[i]:
            carry = F32(1.0) if open_mask[i] else F32(0.0)
        out[i] = carry
    return out


def _nonzero_sign(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, F32(1), F32(-1)).astype(x.dtype)


def euler_from_quaternion(quaternions: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternions -> (roll, pitch, yaw), as tensorflow_graphics.geometry.transformation.euler
    .from_quaternion (its safe_shrink and gimbal-lock branches included), in the input's float dtype."""
    q = np.asarray(quaternions, dtype=F32)
    dt = q.dtype
    eps = dt.type(2.0 * np.finfo(dt).eps)
    shrink = dt.type(1.0) - eps

    def s(v: np.ndarray) -> np.ndarray:
        return (v * shrink).astype(dt)

    x, y, z, w = (q[..., i] for i in range(4))
    two = dt.type(2.0)
    one = dt.type(1.0)
    tx, ty, tz = s(two * x), s(two * y), s(two * z)
    twx, twy, twz = tx * w, ty * w, tz * w
    txx, txy, txz = tx * x, ty * x, tz * x
    tyy, tyz, tzz = ty * y, tz * y, tz * z
    r00 = s(one - (tyy + tzz))
    r10 = s(txy + twz)
    r21 = s(tyz + twx)
    r22 = s(one - (txx + tyy))
    r20 = s(txz - twy)
    r01 = s(txy - twz)
    r02 = s(txz + twy)
    # general case
    theta_y = -np.arcsin(r20)
    sign_cos = _nonzero_sign(np.cos(theta_y))
    r00e = _nonzero_sign(r00) * eps + r00
    r22e = _nonzero_sign(r22) * eps + r22
    gen = np.stack(
        (np.arctan2(r21 * sign_cos, r22e * sign_cos), theta_y, np.arctan2(r10 * sign_cos, r00e * sign_cos)), -1
    )
    # gimbal lock
    sign_r20 = _nonzero_sign(r20)
    r02e = _nonzero_sign(r02) * eps + r02
    gim = np.stack(
        (
            np.arctan2(-sign_r20 * r01, -sign_r20 * r02e),
            -sign_r20 * dt.type(np.pi / 2.0),
            np.zeros_like(r20),
        ),
        -1,
    )
    is_gimbal = np.abs(np.abs(r20) - one) < dt.type(1.0e-6)
    return np.where(is_gimbal[..., None], gim, gen).astype(dt)


def decode_codepoints(codes: np.ndarray) -> str:
    """language_table: int code points -> UTF-8 text up to the first NUL (tf.strings.unicode_encode + split)."""
    chars = []
    for c in np.asarray(codes).reshape(-1).tolist():
        if c == 0:
            break
        chars.append(chr(c) if 0 <= c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF else "\ufffd")
    return "".join(chars)


def relabel_actions_from_state(action: np.ndarray, state: np.ndarray, dims: int) -> np.ndarray:
    """OpenVLA relabel_bridge_actions: movement = state[t+1, :dims] - state[t, :dims], gripper from action[t];
    the caller drops the last step."""
    state = np.asarray(state, dtype=F32)
    movement = state[1:, :dims] - state[:-1, :dims]
    return np.concatenate([movement, action[:-1, -1:]], axis=1).astype(F32)


def _as_2d(x: np.ndarray, steps: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[:, None]
    return arr.reshape(steps, int(np.prod(arr.shape[1:])))


def _apply_part_op(values: np.ndarray, op: PartOp) -> np.ndarray:
    if op.name == "clip":
        lo, hi = op.args
        return np.clip(values, F32(lo), F32(hi)).astype(F32)
    if op.name == "invert":
        return invert_gripper_actions(values)
    if op.name == "euler_from_quaternion":
        if values.shape[1] != 4:
            raise ValueError(f"euler_from_quaternion needs 4 columns, got {values.shape[1]}")
        return euler_from_quaternion(values)
    if values.shape[1] != 1:
        raise ValueError(f"{op.name} needs a single column, got {values.shape[1]}")
    if op.name == "rel2abs":
        return rel2abs_gripper_actions(values[:, 0])[:, None]
    if op.name == "binarize":
        return binarize_gripper_actions(values[:, 0])[:, None]
    raise ValueError(f"unknown part op {op.name}")


def build_action(parts: tuple[ActionPart, ...], steps: dict[str, np.ndarray], length: int) -> np.ndarray:
    cols = []
    for part in parts:
        if part.zeros or part.ones:
            n = part.zeros or part.ones
            cols.append(np.full((length, n), F32(0 if part.zeros else 1), F32))
            continue
        if part.key not in steps:
            raise KeyError(f"action part key {part.key!r} is not in the episode")
        values = _as_2d(steps[part.key], length)
        if part.cols is not None:
            values = values[:, slice(*part.cols)]
        # OpenVLA casts bool / int parts (open_gripper, target_close) to float32 before any op
        values = values.astype(F32)
        for op in part.ops:
            values = _apply_part_op(values, op)
        cols.append(values)
    return np.concatenate(cols, axis=1).astype(F32)


@dataclass
class Episode:
    """One episode's parsed step features (leading axis T) plus provenance and the standardized result."""

    steps: dict[str, Any]
    step_index: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    action: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.step_index.shape[0])

    def slice_steps(self, sl: slice) -> None:
        self.steps = {k: v[sl] for k, v in self.steps.items()}
        self.step_index = self.step_index[sl]
        if self.action is not None:
            self.action = self.action[sl]


def _run_op(ep: Episode, op: EpisodeOp) -> None:
    if op.name == "drop_first":
        ep.slice_steps(slice(int(op.params["n"]), None))
    elif op.name == "action":
        ep.action = build_action(op.parts, ep.steps, ep.length)
    elif op.name == "relabel_from_state":
        if ep.action is None:
            raise ValueError("relabel_from_state must come after action")
        state = _as_2d(ep.steps[op.params["key"]], ep.length)
        relabelled = relabel_actions_from_state(ep.action, state, int(op.params["dims"]))
        ep.slice_steps(slice(None, -1) if ep.length else slice(0, 0))
        ep.action = relabelled
    else:
        raise ValueError(f"unknown standardize op {op.name}")


def decode_language(spec: DatasetSpec, raw: Any, length: int) -> list[str]:
    """Per-step instructions as OpenVLA sees them (not stripped; lowercased later, in the prompt)."""
    if spec.language_decode == "codepoints":
        codes = np.asarray(raw).reshape(length, -1) if length else np.zeros((0, 1), np.int64)
        return [decode_codepoints(row) for row in codes]
    return [b.decode("utf-8", errors="replace") if isinstance(b, (bytes, bytearray)) else str(b) for b in raw]


def build_proprio(spec: DatasetSpec, ep: Episode) -> np.ndarray:
    """OpenVLA's proprio of one (standardized, so already sliced) episode: (T, D) float32.

    openvla prismatic/vla/datasets/rlds/dataset.py:157-168 (restructure): for each of state_obs_keys, a
    1-wide zero column where the key is None, else tf.cast(observation[key], tf.float32); concatenated on
    axis 1. observation[key] is what the standardization transform left there (oxe/transforms.py), which
    the registry's `state:` derivations reproduce (DatasetSpec.state_parts). Steps dropped by the transform
    (drop_first, relabel_from_state) are dropped here too: ep.steps is sliced with the actions.
    """
    length = ep.length
    cols = []
    for key in spec.state_keys:
        if key is None:
            cols.append(np.zeros((length, 1), F32))
        else:
            cols.append(build_action(spec.state_parts(key), ep.steps, length))
    if not cols:
        return np.zeros((length, 0), F32)
    return np.concatenate(cols, axis=1).astype(F32)


def standardize(spec: DatasetSpec, ep: Episode) -> tuple[np.ndarray, list[str]]:
    """Run the registry ops; returns the (T', 7) float32 action and T' instructions (ep is sliced in place)."""
    for op in spec.standardize:
        _run_op(ep, op)
    assert ep.action is not None
    if ep.action.ndim != 2 or ep.action.shape[1] != 7:
        raise ValueError(f"{spec.name}: standardized action has shape {ep.action.shape}, expected (T, 7)")
    language = decode_language(spec, ep.steps[spec.language_key], ep.length)
    return ep.action, language
