"""Un-normalizing predicted actions with a checkpoint's dataset statistics, as OpenVLA does.

Pure numpy (no torch): the server, the evaluation and clients can use it on their own.

Reading a checkpoint's statistics and choosing the dataset (`unnorm_key`) are here; the BOUNDS_Q99 maps
themselves (OpenVLA's inverse, predict_action: 0.5*(a+1)*(q99-q01)+q01 where mask, a elsewhere) are
data_tools/normalize.py's, the same module the converter normalized the training data with. Statistics
are OpenVLA's format (docs/DESIGN.md, "Statistics"): {dataset_name: {"action": {"q01", "q99", "mask", ...}, ...}}.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from data_tools.converted_format import STATISTICS_FILE as STATS_NAME
from data_tools.normalize import normalize_bounds_q99, unnormalize_bounds_q99


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


# The maps themselves live in data_tools/normalize.py, shared with the converter that wrote the data.
unnormalize_actions = unnormalize_bounds_q99
normalize_actions = normalize_bounds_q99
