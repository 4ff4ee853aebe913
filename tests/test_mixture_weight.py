"""What `weight` means, checked against OpenVLA's balanced share (the meaning is documented in
data_tools/training_mixture.py's docstring and docs/DESIGN.md 2.8).

OpenVLA samples dataset d with probability w_d * n_d / sum(w * n), n = the dataset's `num_transitions`
(openvla/openvla c8f03f4, prismatic/vla/datasets/rlds/dataset.py:518-520, `make_interleaved_dataset` with
`balance_weights=True`, which prismatic/vla/datasets/datasets.py:115 always passes). Our loader
(llava_vla_plugin/core/training_data.py) has no sampler: a training mixture's `weight` is a per-file copy
multiplier. These tests take a real conversion of three datasets of different sizes, with OpenVLA weights
in a download spec, and count what the loader yields per dataset.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_tools.converted_format import STATISTICS_FILE, TRAIN_FILE
from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset
from llava_vla_plugin.core.training_data import load_data

# OpenVLA weights, deliberately unequal, on datasets of deliberately unequal sizes
WEIGHTS = {"bridge_orig": 1.0, "language_table": 2.0, "fractal20220817_data": 0.5}
EPISODES = {"bridge_orig": 6, "language_table": 3, "fractal20220817_data": 8}
STEPS = {"bridge_orig": (8, 12), "language_table": (3, 5), "fractal20220817_data": (4, 9)}


def openvla_balanced_share(weights: dict[str, float], sizes: dict[str, int]) -> dict[str, float]:
    """OpenVLA's rule, written from its source (see the module docstring), not from ours:
    sample_weights = weights * dataset_sizes, then divided by their sum."""
    names = list(weights)
    p = np.array([weights[n] for n in names]) * np.array([sizes[n] for n in names], dtype=float)
    return dict(zip(names, (p / p.sum()).tolist()))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A real conversion driven by a download spec with OpenVLA weights (the user's path: spec -> convert)."""
    from data_tools.convert import RunOptions, convert, requests_from_mixture
    from data_tools.registry import Registry

    root = tmp_path_factory.mktemp("rlds")
    for seed, name in enumerate(WEIGHTS):
        write_rlds_dataset(root, name, splits={"train": EPISODES[name]}, steps=STEPS[name], image_size=(8, 10), seed=seed)
    spec = root / "spec.yaml"
    spec.write_text("datasets:\n" + "".join(f"  - name: {n}\n    weight: {w}\n" for n, w in WEIGHTS.items()))
    out = tmp_path_factory.mktemp("out")
    # 2 frames per episode: the kept train frames are then not proportional to num_transitions (which counts
    # every transition, as OpenVLA's), so the tests tell "w x frames" and OpenVLA's "w x num_transitions" apart
    opts = RunOptions(frames_per_episode=2)
    assert convert(root, requests_from_mixture(spec), out, Registry.load(), opts, progress=False) == {}
    return out, spec


def _num_transitions(out: Path) -> dict[str, int]:
    return {n: json.loads((out / n / STATISTICS_FILE).read_text())[n]["num_transitions"] for n in WEIGHTS}


def _train_frames(out: Path) -> dict[str, int]:
    return {n: sum(1 for line in (out / n / TRAIN_FILE).read_text().splitlines() if line.strip()) for n in WEIGHTS}


def _yielded(data_path: Path) -> dict[str, int]:
    samples, _ = load_data(str(data_path), seed=0)
    counts = {n: 0 for n in WEIGHTS}
    for s in samples:
        counts[s["dataset"]] += 1
    return counts


def test_planned_mixture_yields_openvla_balanced_share(converted, tmp_path):
    """`python -m data_tools.mixture --balance` (the planner's main; --balance is now the default's old spelling) turns OpenVLA weights into copy multipliers
    whose yield is OpenVLA's share, w * num_transitions / sum(w * num_transitions), to one frame."""
    from data_tools.training_mixture import main

    out, spec = converted
    mix = tmp_path / "mix.yaml"
    assert main(["--data-dir", str(out), "--weights", str(spec), "--balance", "--out", str(mix)]) == 0
    counts = _yielded(mix)
    total = sum(counts.values())
    assert total == sum(_train_frames(out).values())  # fraction 1: as many samples as train frames
    want = openvla_balanced_share(WEIGHTS, _num_transitions(out))
    for name, share in want.items():
        assert abs(counts[name] - share * total) < 1, (name, counts, want)
    # the check can fail: shares from the weights alone, or weighted by the kept frames, are far from these
    alone = {n: w / sum(WEIGHTS.values()) for n, w in WEIGHTS.items()}
    by_frames = openvla_balanced_share(WEIGHTS, _train_frames(out))
    assert min(max(abs(want[n] - other[n]) for n in WEIGHTS) for other in (alone, by_frames)) > 0.05


def test_converter_mixture_yields_openvla_balanced_share(converted):
    """convert's OUT/mixture.yaml (default rule `balanced`) yields OpenVLA's share w * num_transitions / sum(w * n)
    to one frame, though --frames-per-episode 2 kept 12 / 6 / 16 train frames of 44 / 12 / 63 transitions. On this
    fixture OpenVLA's share is 0.442 / 0.241 / 0.317, weight x kept frames (convert's old file) 0.375 / 0.375 / 0.25."""
    out, _ = converted
    spec = yaml.safe_load((out / "mixture.yaml").read_text())
    assert spec["vla_mixture"]["weighting"] == "balanced"
    counts = _yielded(out / "mixture.yaml")
    total = sum(counts.values())
    assert total == sum(_train_frames(out).values())
    want = openvla_balanced_share(WEIGHTS, _num_transitions(out))
    assert [round(want[n], 3) for n in WEIGHTS] == [0.442, 0.241, 0.317]
    for name, share in want.items():
        assert abs(counts[name] - share * total) < 1, (name, counts, want)
    by_frames = openvla_balanced_share(WEIGHTS, _train_frames(out))
    assert [round(by_frames[n], 3) for n in WEIGHTS] == [0.375, 0.375, 0.25]


def test_planned_mixture_at_a_fraction_keeps_openvla_share(converted, tmp_path):
    """The default rule of `data_tools.mixture` at --fraction 0.5: half the frames, OpenVLA's shares to one frame."""
    from data_tools.training_mixture import main

    out, spec = converted
    mix = tmp_path / "half.yaml"
    assert main(["--data-dir", str(out), "--weights", str(spec), "--fraction", "0.5", "--out", str(mix)]) == 0
    counts = _yielded(mix)
    total = sum(counts.values())
    assert total == round(0.5 * sum(_train_frames(out).values()))
    for name, share in openvla_balanced_share(WEIGHTS, _num_transitions(out)).items():
        assert abs(counts[name] - share * total) < 1, (name, counts)


def test_kept_frames_rule_writes_the_old_copy_multipliers(converted, tmp_path):
    """convert --weighting kept_frames keeps the old file: the spec's OpenVLA weight is the copy multiplier, so
    dataset d yields floor(w)*f + round(frac(w)*f) of its f kept frames (share w * f / sum(w * f)), and the file
    records the rule."""
    import shutil

    from data_tools.convert import _write_top_level, requests_from_mixture

    src, spec = converted
    out = tmp_path / "out"
    shutil.copytree(src, out)
    _write_top_level(out, requests_from_mixture(spec), "kept_frames")
    assert yaml.safe_load((out / "mixture.yaml").read_text())["vla_mixture"]["weighting"] == "kept_frames"
    frames = _train_frames(out)
    counts = _yielded(out / "mixture.yaml")
    for name, w in WEIGHTS.items():
        assert counts[name] == int(np.floor(w)) * frames[name] + round((w - np.floor(w)) * frames[name])
    total = sum(counts.values())
    for name, share in openvla_balanced_share(WEIGHTS, frames).items():
        assert abs(counts[name] - share * total) < 1, (name, counts)


def test_old_mixture_file_still_loads_and_the_log_names_the_rule(converted, tmp_path, caplog):
    """A mixture.yaml written by convert before the rule was recorded (no `vla_mixture:`) trains as before, and the
    training log says its rule is unknown and what such files meant; a recorded rule is logged by name."""
    out, _ = converted
    old = tmp_path / "old_mixture.yaml"
    old.write_text("# LLaVA-NeXT --data_path file\n" + yaml.safe_dump({"datasets": [
        {"json_path": str(out / n / TRAIN_FILE), "sampling_strategy": "all", "weight": w} for n, w in WEIGHTS.items()]}))
    with caplog.at_level(logging.WARNING, logger="llava_vla_plugin.core.training_data"):
        counts = _yielded(old)
    frames = _train_frames(out)
    assert counts == {n: int(np.floor(w)) * frames[n] + round((w - np.floor(w)) * frames[n]) for n, w in WEIGHTS.items()}
    assert "weighting rule unknown (written before the mixture file recorded its weighting rule" in caplog.text
    assert "kept_frames" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llava_vla_plugin.core.training_data"):
        _yielded(out / "mixture.yaml")
    assert "weighting rule balanced" in caplog.text
