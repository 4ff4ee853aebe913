"""Dataset statistics and BOUNDS_Q99 normalization, numerically as OpenVLA computes them.

Statistics: openvla get_dataset_statistics (prismatic/vla/datasets/rlds/utils/data_utils.py): numpy
mean/std/max/min/quantile over the float32 actions of every transition of split="all", after the
standardization transform and before skip_unlabeled. OpenVLA trains with load_proprio=False, so its
"proprio" entry is computed over zeros shaped like the actions; we reproduce that.

Normalization: openvla normalize_action_and_proprio with NormalizationType.BOUNDS_Q99, which runs in
TensorFlow float32 with numpy float64 bounds: (q99 - q01 + 1e-8) is formed in float64 and cast once.
"""

from __future__ import annotations

import json
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


def compute_statistics(
    actions: np.ndarray, num_trajectories: int, mask: Sequence[bool] = (True,) * 6 + (False,)
) -> dict[str, Any]:
    """actions: (N, 7) float32, every transition of split="all" in file order."""
    actions = np.asarray(actions, dtype=F32)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ValueError("cannot compute statistics: the dataset has no transitions")
    action_stats = _summary(actions)
    action_stats["mask"] = [bool(m) for m in mask]
    return {
        "action": action_stats,
        "proprio": _summary(np.zeros_like(actions)),
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": int(num_trajectories),
    }


def normalize_bounds_q99(actions: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """clip(2*(x-q01)/(q99-q01+1e-8)-1, -1, 1) where mask, then 0 where min == max (gripper included)."""
    a = stats["action"]
    x = np.asarray(actions, dtype=F32)
    low64, high64 = np.asarray(a["q01"], np.float64), np.asarray(a["q99"], np.float64)
    low32 = low64.astype(F32)
    denom = (high64 - low64 + 1e-8).astype(F32)
    scaled = np.clip(F32(2) * (x - low32) / denom - F32(1), F32(-1), F32(1)).astype(F32)
    mask = np.asarray(a.get("mask", [True] * x.shape[-1]), dtype=bool)
    out = np.where(mask, scaled, x)
    zeros = np.asarray(a["min"], np.float64) == np.asarray(a["max"], np.float64)
    return np.where(zeros, F32(0), out).astype(F32)


def unnormalize_bounds_q99(normalized: np.ndarray, stats: Mapping[str, Any]) -> np.ndarray:
    """Inverse of normalize_bounds_q99 where it is invertible (inside [q01, q99], masked dims)."""
    a = stats["action"]
    y = np.asarray(normalized, dtype=np.float64)
    low, high = np.asarray(a["q01"], np.float64), np.asarray(a["q99"], np.float64)
    mask = np.asarray(a.get("mask", [True] * y.shape[-1]), dtype=bool)
    return np.where(mask, 0.5 * (y + 1) * (high - low + 1e-8) + low, y)


def zero_action_keep_mask(normalized: np.ndarray, q01: Sequence[float], q99: Sequence[float]) -> np.ndarray:
    """OpenVLA's DROID zero_action_filter on normalized actions: keep frames whose first six dims differ
    from the normalized zero action by more than 1e-5."""
    lo, hi = np.asarray(q01, F32), np.asarray(q99, F32)
    norm_zero = F32(2) * (np.zeros_like(lo) - lo) / (hi - lo + F32(1e-8)) - F32(1)
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
