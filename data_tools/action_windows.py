"""Future-action windows [H, D] from an episode's normalized action sequence (pure functions, numpy).

Two named rules, both read from the sources (docs/DESIGN.md 2.7):

* ``openvla`` -- OpenVLA's `chunk_act_obs` (prismatic/vla/datasets/rlds/traj_transforms.py) with goal
  relabeling off: the goal is the episode's last step. The window of step t is actions t..t+H-1 with the
  indices clipped to the goal; past the goal, relative dimensions become 0 (in normalized space: OpenVLA
  chunks after normalizing) and absolute ones (the gripper) repeat the goal's value. Every frame is kept.
  (OpenVLA's own training relabels the goal uniformly at random per sample, which is not reproducible.)
* ``oft`` -- OpenVLA-OFT's rewrite of the same function: `effective_traj_len = traj_len -
  future_action_window_size`, i.e. the last H-1 frames of each episode are not training samples and no
  window is padded. The default for chunked heads.

With H = 1 both rules give the step's own action and keep every frame.
"""
from __future__ import annotations

import numpy as np

WINDOW_MODES = ("oft", "openvla")


def _check(mode: str, horizon: int) -> None:
    if mode not in WINDOW_MODES:
        raise ValueError(f"unknown window mode {mode!r}: use one of {', '.join(WINDOW_MODES)}")
    if horizon < 1:
        raise ValueError(f"the horizon H must be >= 1, got {horizon}")


def frame_has_window(t: int, length: int, horizon: int, mode: str) -> bool:
    """Whether step position t (0-based, in an episode of `length` steps) is a training frame under `mode`."""
    _check(mode, horizon)
    return mode == "openvla" or t + horizon - 1 <= length - 1


def action_window(actions: np.ndarray, t: int, horizon: int, mode: str, absolute_mask) -> np.ndarray:
    """The window [H, D] of step position t of one episode's normalized actions [T, D] (float32).

    Raises ValueError where the rule has no window for t (oft: one of the last H-1 frames)."""
    _check(mode, horizon)
    actions = np.asarray(actions)
    length = len(actions)
    if not 0 <= t < length:
        raise ValueError(f"step position {t} outside an episode of {length} steps")
    if not frame_has_window(t, length, horizon, mode):
        raise ValueError(f"step position {t} is one of the last {horizon - 1} of a {length}-step episode: "
                         "the oft rule drops those frames")
    idx = t + np.arange(horizon)
    window = actions[np.minimum(idx, length - 1)].astype(np.float32, copy=True)
    past = idx > length - 1
    if past.any():  # openvla only: relative dims neutral (0), absolute dims keep the goal's value
        relative = ~np.asarray(absolute_mask, dtype=bool)
        window[np.ix_(past, relative)] = 0.0
    return window
