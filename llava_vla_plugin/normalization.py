"""Un-normalizing predicted actions with a checkpoint's dataset statistics, as OpenVLA does.

Pure numpy (no torch): the server, the evaluation and clients can use it on their own.

OpenVLA's BOUNDS_Q99 inverse (prismatic/extern/hf/modeling_prismatic.py, predict_action):
    action = 0.5 * (a + 1) * (q99 - q01) + q01   where mask is true
    action = a                                   where mask is false (the gripper: already 0/1-ish)
A missing mask means every dimension is un-normalized. Statistics are OpenVLA's format
(DESIGN.md 2.2): {dataset_name: {"action": {"q01", "q99", "mask", ...}, ...}}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import numpy as np

STATS_NAME = "dataset_statistics.json"


class UnnormKeyError(KeyError):
    """No or an unknown `unnorm_key` where the statistics hold several datasets (or not this one)."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is meant for people
        return str(self.args[0]) if self.args else ""


def load_statistics(checkpoint: str | Path) -> dict:
    path = Path(checkpoint)
    if path.is_dir():
        path = path / STATS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a VLA checkpoint carries the dataset statistics its actions "
                                "were normalized with; copy dataset_statistics.json from the run's output dir")
    stats = json.loads(path.read_text())
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{path}: expected {{dataset_name: statistics}}, found {type(stats).__name__} with no datasets")
    for name, entry in stats.items():
        if not isinstance(entry, dict) or "action" not in entry or not {"q01", "q99"} <= set(entry["action"]):
            raise ValueError(f"{path}: dataset {name!r} has no action q01/q99 statistics")
    return stats


def resolve_unnorm_key(norm_stats: Mapping[str, dict], unnorm_key: str | None) -> str:
    """OpenVLA's rule: the key may be omitted when there is exactly one dataset."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise UnnormKeyError(f"this model was trained on {len(keys)} datasets; pass unnorm_key, one of: {keys}")
        return keys[0]
    if unnorm_key not in norm_stats:
        raise UnnormKeyError(f"unknown unnorm_key {unnorm_key!r}; this model's statistics hold: {keys}")
    return unnorm_key


def action_stats(norm_stats: Mapping[str, dict], unnorm_key: str | None) -> dict:
    return norm_stats[resolve_unnorm_key(norm_stats, unnorm_key)]["action"]


def unnormalize_actions(normalized, stats: Mapping[str, list]) -> np.ndarray:
    """[..., D] actions in [-1, 1] -> the dataset's units (float64), mask respected."""
    a = np.asarray(normalized, dtype=np.float64)
    low = np.asarray(stats["q01"], dtype=np.float64)
    high = np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    if a.shape[-1:] != low.shape or high.shape != low.shape or mask.shape != low.shape:
        raise ValueError(f"actions of dimension {a.shape[-1:]} do not match the statistics "
                         f"(q01 {low.shape}, q99 {high.shape}, mask {mask.shape})")
    return np.where(mask, 0.5 * (a + 1.0) * (high - low) + low, a)


def normalize_actions(actions, stats: Mapping[str, list]) -> np.ndarray:
    """The forward BOUNDS_Q99 map of DESIGN.md 2.2 (for checks; the converter owns the real one)."""
    x = np.asarray(actions, dtype=np.float64)
    low = np.asarray(stats["q01"], dtype=np.float64)
    high = np.asarray(stats["q99"], dtype=np.float64)
    mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    out = np.where(mask, np.clip(2 * (x - low) / (high - low + 1e-8) - 1, -1, 1), x)
    if "min" in stats and "max" in stats:
        out = np.where(np.asarray(stats["min"]) == np.asarray(stats["max"]), 0.0, out)
    return out
