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
    try:
        stats = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); copy dataset_statistics.json again from the run's output "
                         "dir") from None
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{path}: expected {{dataset_name: statistics}}, found {type(stats).__name__} with no datasets")
    for name, entry in stats.items():
        if not isinstance(entry, dict) or "action" not in entry or not {"q01", "q99"} <= set(entry["action"]):
            raise ValueError(f"{path}: dataset {name!r} has no action q01/q99 statistics")
    return stats


def resolve_unnorm_key(norm_stats: Mapping[str, dict], unnorm_key: str | None, name: str = "unnorm_key") -> str:
    """The one un-normalization key rule of every reader (VLAPolicy and `/act`, the vla-eval server, offline
    eval, HFVLAPolicy), OpenVLA's two rules together:
      - the key may be omitted when the checkpoint holds exactly one dataset (OpenVLA's `_check_unnorm_key`);
      - `<key>_no_noops` stands in for an absent `<key>` (its run_libero_eval.py: its LIBERO checkpoints
        hold the `_no_noops` datasets); an exact key always wins.
    The second rule lived in the vla-eval server alone, so `/act` refused the key the server accepted.
    `name`: what the caller calls the key in messages (a request field `unnorm_key`, a flag `--unnorm-key`)."""
    keys = sorted(norm_stats)
    if unnorm_key is None:
        if len(keys) != 1:
            raise UnnormKeyError(f"this model was trained on {len(keys)} datasets; pass {name}, one of: {keys}")
        return keys[0]
    if unnorm_key in norm_stats:
        return unnorm_key
    if f"{unnorm_key}_no_noops" in norm_stats:
        return f"{unnorm_key}_no_noops"
    raise UnnormKeyError(f"unknown {name} {unnorm_key!r}; this model's statistics hold: {keys}")


# The name the vla-eval server's callers know; the same rule.
resolve_unnorm_key_no_noops = resolve_unnorm_key


def check_serving_statistics(checkpoint: str | Path, unnorm_key: str | None, *, flag: str = "--unnorm-key",
                             key_required: bool = True) -> tuple[dict, str | None]:
    """What a server checks before it loads any weight: `checkpoint` is a checkpoint directory, its
    dataset_statistics.json reads, and `unnorm_key` (the command line's `flag`) names one of its datasets.
    Returns (statistics, resolved key); the key is None when it may be left to each request
    (`key_required=False`, serve's /act) and none was given. Raises FileNotFoundError, ValueError or
    UnnormKeyError with a message that names the file or the flag and the available keys."""
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {path}: not a checkpoint directory (no config.json); pass a training "
                                "OUTPUT_DIR or one of its checkpoint-N folders")
    stats = load_statistics(path)
    if unnorm_key is None and not key_required:
        return stats, None
    return stats, resolve_unnorm_key(stats, unnorm_key, flag)


def action_stats(norm_stats: Mapping[str, dict], unnorm_key: str | None) -> dict:
    return norm_stats[resolve_unnorm_key(norm_stats, unnorm_key)]["action"]


# The maps themselves live in data_tools/normalize.py, shared with the converter that wrote the data.
unnormalize_actions = unnormalize_bounds_q99
normalize_actions = normalize_bounds_q99
