"""Dataset statistics and BOUNDS_Q99 normalization, numerically as OpenVLA computes them.

Statistics: openvla get_dataset_statistics (prismatic/vla/datasets/rlds/utils/data_utils.py): numpy
mean/std/max/min/quantile over the float32 actions of every transition of split="all", after the
standardization transform and before skip_unlabeled. Its "proprio" entry (data_utils.py:219-257) is
computed over the proprio where the dataset was loaded with load_proprio=True, else over zeros shaped like
the actions (OpenVLA trains with load_proprio=False). We write the first where the converter builds the
proprio, the second otherwise, and say which in the entry's `source` field ("state" / "zeros";
converted_format.proprio_source reads it, "unknown" for files written before the field).

Normalization: openvla normalize_action_and_proprio with NormalizationType.BOUNDS_Q99, which runs in
TensorFlow float32 with numpy float64 bounds: (q99 - q01 + 1e-8) is formed in float64 and cast once.
Un-normalization: OpenVLA's predict_action inverse (float64, no epsilon). This module is the one owner of
both: the converter normalizes with it, the policy/server/eval un-normalize with it (pure numpy, no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

F32 = np.float32
STAT_KEYS = ("mean", "std", "max", "min", "q01", "q99")


def _summary(values: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "max": values.max(0).tolist(),
        "min": values.min(0).tolist(),
        "q01": np.quantile(values, 0.01, axis=0).tolist(),
        "q99": np.quantile(values, 0.99, axis=0).tolist(),
    }


def proprio_statistics(proprio: np.ndarray | None, actions: np.ndarray) -> dict[str, Any]:
    """OpenVLA's "proprio" entry (get_dataset_statistics, data_utils.py:222-224 and 250-257): over the proprio
    rows (same transitions as `actions`) when given, with source "state"; else over tf.zeros_like(action),
    with source "zeros". The numeric fields are OpenVLA's; `source` is ours."""
    from data_tools.converted_format import PROPRIO_SOURCE_STATE, PROPRIO_SOURCE_ZEROS

    if proprio is None:
        return {**_summary(np.zeros_like(np.asarray(actions, dtype=F32))), "source": PROPRIO_SOURCE_ZEROS}
    proprio = np.asarray(proprio, dtype=F32)
    if proprio.ndim != 2 or len(proprio) != len(actions):
        raise ValueError(f"proprio rows {proprio.shape} do not line up with the actions {np.shape(actions)}")
    return {**_summary(proprio), "source": PROPRIO_SOURCE_STATE}


def compute_statistics(
    actions: np.ndarray, num_trajectories: int, mask: Sequence[bool] = (True,) * 6 + (False,),
    proprio: np.ndarray | None = None,
) -> dict[str, Any]:
    """actions: (N, 7) float32, every transition of split="all" in file order; proprio: (N, D) float32 of the
    same transitions, or None (the entry is then over zeros, as OpenVLA without proprio)."""
    actions = np.asarray(actions, dtype=F32)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ValueError("cannot compute statistics: the dataset has no transitions")
    action_stats = _summary(actions)
    action_stats["mask"] = [bool(m) for m in mask]
    return {
        "action": action_stats,
        "proprio": proprio_statistics(proprio, actions),
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": int(num_trajectories),
    }


# OpenVLA's forward map divides by (q99 - q01 + 1e-8) (normalize_action_and_proprio, so a dimension with
# q01 == q99 does not divide by zero); its inverse (modeling_prismatic.py predict_action) multiplies by
# (q99 - q01) with no epsilon. Both are kept exactly: inverse(forward(x)) is x up to 1e-8 relative, far below
# one action bin (2/256), and the policy's actions are OpenVLA's to the last bit.
FORWARD_EPSILON = 1e-8


@dataclass(frozen=True)
class ActionStatistics:
    """The part of one dataset's statistics that BOUNDS_Q99 (un)normalization reads, typed.

    Built from OpenVLA's per-dataset entry ({"action": {...}, ...}) or from its "action" entry itself.
    A missing mask means every dimension is normalized; min/max (absent in some published files) mark
    the unused dimensions (min == max), which the forward map sets to 0.
    """

    q01: np.ndarray
    q99: np.ndarray
    mask: np.ndarray
    min: np.ndarray | None = None
    max: np.ndarray | None = None

    @classmethod
    def from_mapping(cls, stats: "Mapping[str, Any] | ActionStatistics") -> "ActionStatistics":
        if isinstance(stats, ActionStatistics):
            return stats
        a = stats["action"] if "action" in stats else stats
        q01, q99 = np.asarray(a["q01"], np.float64), np.asarray(a["q99"], np.float64)
        mask = np.asarray(a["mask"], bool) if a.get("mask") is not None else np.ones(q01.shape, bool)
        if q99.shape != q01.shape or mask.shape != q01.shape:
            raise ValueError(f"statistics disagree in size: q01 {q01.shape}, q99 {q99.shape}, mask {mask.shape}")
        lo, hi = (np.asarray(a[k], np.float64) if a.get(k) is not None else None for k in ("min", "max"))
        return cls(q01, q99, mask, lo, hi)

    @property
    def unused(self) -> np.ndarray:
        """Dimensions that never vary (min == max): OpenVLA maps them to 0."""
        if self.min is None or self.max is None:
            return np.zeros(self.q01.shape, bool)
        return self.min == self.max

    def check(self, values: np.ndarray) -> None:
        if values.shape[-1:] != self.q01.shape:
            raise ValueError(f"actions of dimension {values.shape[-1:]} do not match the statistics "
                             f"(q01 {self.q01.shape}, q99 {self.q99.shape}, mask {self.mask.shape})")


StatsLike = "Mapping[str, Any] | ActionStatistics"


def normalize_bounds_q99(actions: np.ndarray, stats: StatsLike) -> np.ndarray:
    """OpenVLA's forward map, float32 as its TensorFlow pipeline computes it (float64 bounds cast once):
    clip(2*(x-q01)/(q99-q01+1e-8)-1, -1, 1) where mask, x elsewhere; then 0 where min == max (gripper included)."""
    s = ActionStatistics.from_mapping(stats)
    x = np.asarray(actions, dtype=F32)
    s.check(x)
    low32 = s.q01.astype(F32)
    denom = (s.q99 - s.q01 + FORWARD_EPSILON).astype(F32)
    scaled = np.clip(F32(2) * (x - low32) / denom - F32(1), F32(-1), F32(1)).astype(F32)
    out = np.where(s.mask, scaled, x)
    return np.where(s.unused, F32(0), out).astype(F32)


def unnormalize_bounds_q99(normalized: np.ndarray, stats: StatsLike) -> np.ndarray:
    """OpenVLA's inverse (predict_action), float64: 0.5*(y+1)*(q99-q01)+q01 where mask, y elsewhere.
    Inverts normalize_bounds_q99 inside [q01, q99] up to the forward epsilon (see FORWARD_EPSILON)."""
    s = ActionStatistics.from_mapping(stats)
    y = np.asarray(normalized, dtype=np.float64)
    s.check(y)
    return np.where(s.mask, 0.5 * (y + 1.0) * (s.q99 - s.q01) + s.q01, y)


def zero_action_keep_mask(normalized: np.ndarray, q01: Sequence[float], q99: Sequence[float]) -> np.ndarray:
    """OpenVLA's DROID zero_action_filter on normalized actions: keep frames whose first six dims differ
    from the normalized zero action by more than 1e-5."""
    lo, hi = np.asarray(q01, F32), np.asarray(q99, F32)
    # OpenVLA's filter holds DROID's bounds as float32 constants, so its epsilon is added in float32 here
    norm_zero = F32(2) * (np.zeros_like(lo) - lo) / (hi - lo + F32(FORWARD_EPSILON)) - F32(1)
    return np.any(np.abs(np.asarray(normalized, F32)[:, :6] - norm_zero) > F32(1e-5), axis=1)


def load_published_statistics(path: str | Path, name: str) -> dict[str, Any]:
    """Statistics for `name` from an OpenVLA dataset_statistics.json, a config with "norm_stats", or a file
    holding a single dataset's statistics."""
    doc = json.loads(Path(path).read_text())
    if isinstance(doc, Mapping) and "norm_stats" in doc:
        doc = doc["norm_stats"]
    if isinstance(doc, Mapping) and "action" in doc:
        return dict(doc)
    if isinstance(doc, Mapping) and name in doc:
        return dict(doc[name])
    known = sorted(doc) if isinstance(doc, Mapping) else []
    raise KeyError(f"{path} has no statistics for {name!r}; it has: {', '.join(known) or 'nothing usable'}")


def with_mask(stats: Mapping[str, Any], mask: Sequence[bool]) -> dict[str, Any]:
    """OpenVLA overwrites the action mask with the config's action_normalization_mask after loading."""
    out = json.loads(json.dumps(stats))
    out["action"]["mask"] = [bool(m) for m in mask]
    return out
