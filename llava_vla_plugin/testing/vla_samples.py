"""Small converted-format VLA datasets (docs/DESIGN.md 2.1 layout) for plugin tests and benchmarks.

The end-to-end path (RLDS fixture -> data_tools.convert) makes the same layout; this writer exists
so plugin tests can choose exactly how actions depend on images and instructions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image


def colour_image(rng: np.random.Generator, colour: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A noisy image dominated by one of three colour channels: the visual cue of image-use tests."""
    img = rng.integers(0, 60, size=(*size, 3), dtype=np.uint8)
    img[..., colour] = rng.integers(180, 256, size=size, dtype=np.uint8)
    return img


def write_vla_dataset(
    out: str | Path,
    name: str,
    n: int,
    *,
    split: str = "train",
    image_fn: Callable[[int, np.random.Generator], np.ndarray],
    action_fn: Callable[[int, np.random.Generator], list[float]],
    instruction_fn: Callable[[int], str] = lambda i: "pick up the block",
    seed: int = 0,
    wrist_fn: Callable[[int, np.random.Generator], np.ndarray] | None = None,
    proprio_fn: Callable[[int, np.random.Generator], list[float]] | None = None,
) -> Path:
    """One frame per episode. `wrist_fn`: a wrist view too (`image_wrist`, converted_format's layout); `proprio_fn`:
    a raw state per frame in `<split>_proprio.npz` with statistics over it (`"source": "state"`), as convert keeps them."""
    from data_tools.converted_format import EpisodeActions, episode_proprio_file

    out = Path(out)
    rng = np.random.default_rng(seed)
    (out / name / "images" / split).mkdir(parents=True, exist_ok=True)
    lines, states = [], {}
    for i in range(n):
        rel = f"{name}/images/{split}/{i:06d}/0000.jpg"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image_fn(i, rng)).save(out / rel, quality=95)
        wrist = {}
        if wrist_fn is not None:
            wrel = f"{name}/images_wrist/{split}/{i:06d}/0000.jpg"
            (out / wrel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(wrist_fn(i, rng)).save(out / wrel, quality=95)
            wrist = {"image_wrist": wrel}
        if proprio_fn is not None:
            states[i] = (np.asarray([proprio_fn(i, rng)], np.float32), np.asarray([0]))
        action = [float(a) for a in action_fn(i, rng)]
        instruction = instruction_fn(i)
        lines.append(json.dumps({
            "id": f"{name}/{split}/{i:06d}/0000",
            "image": rel,
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat action should the robot take to {instruction.lower()}?"},
                {"from": "gpt", "value": action},
            ],
            "dataset": name, "split": split, "episode": i, "step": 0, "action_raw": action, "instruction": instruction, **wrist,
        }))
    (out / name / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    proprio = {"mean": [0.0] * 7, "std": [0.0] * 7, "max": [0.0] * 7, "min": [0.0] * 7, "q01": [0.0] * 7, "q99": [0.0] * 7}
    if states:
        values = np.concatenate([s for s, _ in states.values()]).astype(np.float64)
        EpisodeActions.from_episodes(states, (True,) * values.shape[1]).save(out / name / episode_proprio_file(split))
        proprio = {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(), "max": values.max(0).tolist(),
                   "min": values.min(0).tolist(), "q01": np.quantile(values, 0.01, axis=0).tolist(),
                   "q99": np.quantile(values, 0.99, axis=0).tolist(), "source": "state"}
    stats = {name: {
        "action": {"mean": [0.0] * 7, "std": [0.5] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
                   "q01": [-2.0] * 6 + [0.0], "q99": [2.0] * 6 + [1.0], "mask": [True] * 6 + [False]},
        "proprio": proprio,
        "num_transitions": n, "num_trajectories": n}}
    if split == "train" or not (out / name / "dataset_statistics.json").exists():  # the training split's, as convert's
        (out / name / "dataset_statistics.json").write_text(json.dumps(stats, indent=2))
    return out / name / f"{split}.jsonl"


def write_mixture(out: str | Path, entries: list[tuple[str, float]], split: str = "train") -> Path:
    out = Path(out)
    spec = {"datasets": [{"json_path": f"{name}/{split}.jsonl", "sampling_strategy": "all", "weight": w} for name, w in entries]}
    path = out / "mixture.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
