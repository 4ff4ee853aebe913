"""Converted-format episodes with per-episode action sequences (for chunked representations' tests/benchmarks).

Like `vla_samples.write_vla_dataset`, but each episode has several steps and the split's
`<split>_actions.npz` (data_tools.converted_format.EpisodeActions) is written beside the jsonl, as
data_tools.convert writes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from data_tools.converted_format import EEF_POS_ABSOLUTE_MASK, ConvertedSample, EpisodeActions, episode_actions_file


def write_episodes(out: str | Path, name: str, episodes: Sequence[np.ndarray], *, split: str = "train",
                   image_fn: Callable[[int, int, np.random.Generator], np.ndarray],
                   instruction: str = "pick up the block", seed: int = 0) -> Path:
    """episodes: normalized actions [T_e, 7] per episode; image_fn(episode, step, rng) -> HxWx3 uint8."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    lines, seqs = [], {}
    for e, actions in enumerate(episodes):
        actions = np.asarray(actions, np.float32)
        for t, a in enumerate(actions):
            s = ConvertedSample(name, split, e, t, instruction, a, a)
            (out / s.image).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_fn(e, t, rng)).save(out / s.image, quality=95)
            lines.append(s.to_json_line())
        seqs[e] = (actions, np.arange(len(actions)))
    (out / name / f"{split}.jsonl").write_text("".join(lines))
    EpisodeActions.from_episodes(seqs, EEF_POS_ABSOLUTE_MASK).save(out / name / episode_actions_file(split))
    stats = {name: {
        "action": {"mean": [0.0] * 7, "std": [0.5] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
                   "q01": [-2.0] * 6 + [0.0], "q99": [2.0] * 6 + [1.0], "mask": [True] * 6 + [False]},
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": sum(len(a) for a in episodes), "num_trajectories": len(episodes)}}
    (out / name / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    return out / name / f"{split}.jsonl"
