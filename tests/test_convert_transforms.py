"""The numpy transforms against values worked out by hand from OpenVLA's documented semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data_tools.normalize import compute_statistics, normalize_bounds_q99, zero_action_keep_mask
from data_tools.transforms import (
    binarize_gripper_actions,
    decode_codepoints,
    euler_from_quaternion,
    invert_gripper_actions,
    rel2abs_gripper_actions,
)


def test_rel2abs():
    # +1 = close, -1 = open, |x| <= 0.1 = keep; before the first command the gripper is in the opposite state
    assert rel2abs_gripper_actions(np.array([0, 0, 1, 0, 0, -1, 0.05])).tolist() == [1, 1, 0, 0, 0, 1, 1]
    assert rel2abs_gripper_actions(np.array([0, -1, 0, 1])).tolist() == [0, 1, 1, 0]
    assert rel2abs_gripper_actions(np.array([0.0, 0.1, -0.1])).tolist() == [1, 1, 1]  # no command: open
    assert rel2abs_gripper_actions(np.array([])).shape == (0,)


def test_binarize():
    # in-between values take the state reached after them; a trailing in-between run keeps the raw last value
    got = binarize_gripper_actions(np.array([1.0, 0.5, 0.0, 0.3, 0.97, 0.6, 0.4], np.float32))
    np.testing.assert_allclose(got, [1, 0, 0, 1, 1, 0.4, 0.4])
    np.testing.assert_allclose(binarize_gripper_actions(np.array([0.02, 0.96])), [0, 1])


def test_invert():
    np.testing.assert_allclose(invert_gripper_actions(np.array([0.0, 1.0, 0.25])), [1, 0, 0.75])


def test_euler_from_quaternion_matches_textbook_rpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x, y, z, w = q.T
    roll = np.arctan2(2 * (w * x + y * z), 1 - 2 * (x * x + y * y))
    pitch = np.arcsin(np.clip(2 * (w * y - z * x), -1, 1))
    yaw = np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))
    np.testing.assert_allclose(euler_from_quaternion(q), np.stack([roll, pitch, yaw], 1), atol=2e-5)
    # gimbal lock: pitch of +90 degrees
    s = math.sqrt(0.5)
    got = euler_from_quaternion(np.array([[0.0, s, 0.0, s]]))[0]
    assert got[1] == pytest.approx(math.pi / 2, abs=1e-5) and got[2] == 0.0


def test_language_table_codepoints():
    codes = np.zeros(16, np.int32)
    codes[:5] = [ord(c) for c in "Push "]
    codes[6] = ord("x")  # after the first NUL: ignored
    assert decode_codepoints(codes) == "Push "
    assert decode_codepoints(np.zeros(4, np.int32)) == ""


def test_statistics_and_bounds_q99_by_hand():
    a = np.zeros((101, 7), np.float32)
    a[:, 0] = np.arange(101)  # 0..100: q01 = 1, q99 = 99 (linear interpolation)
    a[:, 1] = 5.0  # constant: min == max -> normalized to 0
    a[:, 6] = np.arange(101) % 2  # gripper: not normalized (mask False), min != max
    st = compute_statistics(a, num_trajectories=3)
    act = st["action"]
    assert act["q01"][0] == pytest.approx(1.0) and act["q99"][0] == pytest.approx(99.0)
    assert act["mean"][0] == pytest.approx(50.0) and act["std"][0] == pytest.approx(np.std(np.arange(101)))
    assert act["mask"] == [True] * 6 + [False]
    assert st["num_transitions"] == 101 and st["num_trajectories"] == 3
    assert st["proprio"]["mean"] == [0.0] * 7  # OpenVLA trains with load_proprio=False
    x = np.array([[50.0, 5.0, 0, 0, 0, 0, 1.0], [0.0, 5.0, 0, 0, 0, 0, 0.0], [100.0, 5, 0, 0, 0, 0, 1]], np.float32)
    got = normalize_bounds_q99(x, st)
    assert got[0, 0] == pytest.approx(2 * 49 / 98 - 1, abs=1e-6)
    assert got[1, 0] == -1.0 and got[2, 0] == 1.0  # clipped
    assert (got[:, 1] == 0).all()  # min == max
    assert got[:, 6].tolist() == [1.0, 0.0, 1.0]  # gripper unnormalized
    assert (got[:, 2:6] == 0).all()  # all-zero dims: min == max


def test_zero_action_filter():
    q01, q99 = [-1.0] * 6, [1.0] * 6
    normalized = np.array([[0.0] * 7, [0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 1.0]], np.float32)
    assert zero_action_keep_mask(normalized, q01, q99).tolist() == [False, True]
