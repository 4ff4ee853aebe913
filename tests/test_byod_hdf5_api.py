"""vla-import hdf5 (LIBERO / robomimic layouts written with h5py here), the write_episodes Python API, and the
mixture tool's action-convention check on imported data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from data_tools.byod import ImportInputError, ImportOptions, import_source, write_episodes
from data_tools.converted_format import (PROPRIO_SOURCE_STATE, EpisodeActions, episode_proprio_file, proprio_padding,
                                         proprio_source)
from data_tools.import_hdf5 import PRESETS, Hdf5Source, make_mapping
from data_tools.training_mixture import MixtureToolError, plan_mixture
from data_tools.validate import validate


def _pattern(demo: int, t: int) -> np.ndarray:
    """Top half bright, bottom half dark (orientation is visible), a value per demo and step."""
    img = np.full((24, 32, 3), 30, np.uint8)
    img[:12] = 200
    img[:, :8, 0] = 10 * demo + t
    return img


def write_libero_file(path: Path, demos: int = 3, steps: int = 4, language: str | None = "put the bowl on the plate",
                      drop_actions: tuple[int, ...] = (), seed: int = 0) -> dict[int, np.ndarray]:
    """A LIBERO-layout HDF5 (data/demo_i/obs/agentview_rgb, ee_states, actions; problem_info) via h5py."""
    rng = np.random.default_rng(seed)
    actions = {}
    with h5py.File(path, "w") as h:
        data = h.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Libero_Tabletop", "env_kwargs": {}})
        if language is not None:
            data.attrs["problem_info"] = json.dumps({"language_instruction": language, "domain_name": "kitchen"})
        for d in range(demos):
            g = data.create_group(f"demo_{d}")
            obs = g.create_group("obs")
            obs["agentview_rgb"] = np.stack([_pattern(d, t) for t in range(steps)])
            obs["ee_states"] = rng.normal(size=(steps, 6)).astype(np.float64)
            a = rng.uniform(-1, 1, (steps, 7))
            a[:, 6] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)  # LIBERO: -1 open, +1 closed
            actions[d] = a
            if d not in drop_actions:
                g["actions"] = a
    return actions


def _hdf5_import(path: Path, out: Path, name: str, preset: str = "libero", **kw):
    mapping = make_mapping(preset, kw.pop("mapping", None), kw.pop("instruction", None))
    source = Hdf5Source(path, mapping, preset)
    return import_source(source, out, name, mapping, ImportOptions(progress=False, val_fraction=0.0, **kw))


def _samples(out: Path, name: str) -> list[dict]:
    return [json.loads(l) for l in (out / name / "train.jsonl").read_text().splitlines()]


def test_libero_hdf5_rotated_language_from_problem_info(tmp_path):
    acts = write_libero_file(tmp_path / "task.hdf5")
    out = tmp_path / "out"
    m = _hdf5_import(tmp_path / "task.hdf5", out, "libero_mine")
    assert validate(out)[0].ok
    samples = _samples(out, "libero_mine")
    assert len(samples) == 12 and {s["instruction"] for s in samples} == {"put the bowl on the plate"}
    s = samples[5]  # demo 1, step 1
    img = np.asarray(Image.open(out / s["image"]).convert("RGB"), np.int16)
    # rotate_180 (LIBERO's default, OpenVLA's img[::-1, ::-1]): the bright half is now at the bottom
    assert np.abs(img - _pattern(1, 1)[::-1, ::-1]).mean() < 4  # JPEG q95
    assert img[:12].mean() < 60 < 150 < img[12:].mean()
    np.testing.assert_array_equal(np.float32(s["action_raw"]), np.float32(acts[1][1]))
    assert m["action_convention"] == {"type": "delta_eef", "gripper_open": -1.0, "gripper_closed": 1.0}
    assert m["source"]["orientation"] == "rotate_180"
    proprio = EpisodeActions.load(out / "libero_mine" / episode_proprio_file("train"))
    assert proprio.actions.shape == (12, 6)
    # the statistics' proprio entry is over that state (PROPRIO=1 trains on it), not OpenVLA's zeros
    entry = json.loads((out / "libero_mine" / "dataset_statistics.json").read_text())["libero_mine"]["proprio"]
    assert proprio_source(entry) == PROPRIO_SOURCE_STATE and proprio_padding(entry) == ()
    np.testing.assert_allclose(entry["q99"], np.quantile(proprio.actions, 0.99, axis=0), rtol=1e-6, atol=1e-6)


def test_gripper_mapped_to_openvla_and_demo_without_actions_skipped(tmp_path):
    from dataclasses import replace

    acts = write_libero_file(tmp_path / "task.hdf5", drop_actions=(1,))
    mapping = replace(PRESETS["libero"], to_openvla_gripper=True)
    out = tmp_path / "out"
    m = _hdf5_import(tmp_path / "task.hdf5", out, "libero_ovla", mapping=mapping)
    samples = _samples(out, "libero_ovla")
    assert sorted({s["episode"] for s in samples}) == [0, 2]
    # -1 (open) -> 1, +1 (closed) -> 0: OpenVLA's libero transform on binary commands
    assert [s["action_raw"][6] for s in samples if s["episode"] == 0] == [1.0, 1.0, 0.0, 0.0]
    assert m["action_convention"] == {"type": "delta_eef", "gripper_open": 1.0, "gripper_closed": 0.0}
    assert m["counts"]["splits"]["train"]["dropped_episodes"] == {"no_actions": 1}
    assert "data/demo_1: no_actions" in m["skipped"][0] and "task.hdf5" in m["skipped"][0]
    assert validate(out)[0].ok


def test_robomimic_needs_an_instruction_and_length_mismatch_is_named(tmp_path):
    f = tmp_path / "lift.hdf5"
    with h5py.File(f, "w") as h:
        g = h.create_group("data/demo_0")
        g["obs/agentview_image"] = np.zeros((3, 16, 16, 3), np.uint8)
        g["actions"] = np.zeros((3, 7))
        g2 = h.create_group("data/demo_1")
        g2["obs/agentview_image"] = np.zeros((2, 16, 16, 3), np.uint8)
        g2["actions"] = np.zeros((3, 7))
    with pytest.raises(ImportInputError, match="no episode with finite actions"):
        _hdf5_import(f, tmp_path / "a", "lift", preset="robomimic")
    with pytest.raises(ImportInputError) as e:
        _hdf5_import(f, tmp_path / "b", "lift", preset="robomimic", instruction="lift the cube")
    assert "lift.hdf5: data/demo_1" in str(e.value) and "obs/agentview_image" in str(e.value)


def test_hdf5_cli(tmp_path):
    write_libero_file(tmp_path / "task.hdf5")
    p = subprocess.run([sys.executable, "-m", "data_tools.import_cli", "hdf5", str(tmp_path / "task.hdf5"), "--out",
                        str(tmp_path / "out"), "--instruction", "stack the cups", "--no-progress"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert {s["instruction"] for s in _samples(tmp_path / "out", "task")} == {"stack the cups"}


def _episodes(n: int, seed: int = 0, steps: int = 4, nan_at: tuple[int, int] | None = None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
        if nan_at and nan_at[0] == i:
            a[nan_at[1], 2] = np.nan
        yield {"views": {"primary": rng.integers(0, 255, (steps, 20, 20, 3), dtype=np.uint8)}, "action": a,
               "state": rng.normal(size=(steps, 3)), "instruction": f"task {i}"}


def test_api_writes_the_converted_format_and_resumes(tmp_path):
    out = tmp_path / "out"
    ref = write_episodes(tmp_path / "ref", "api", _episodes(5, nan_at=(3, 1)), val_fraction=0.2, progress=False)
    assert validate(tmp_path / "ref")[0].ok
    assert ref["counts"]["splits"]["train"]["dropped_frames"] == {"nonfinite_action": 1}
    assert ref["split_episodes"] == {"train": 4, "val": 1}

    def crashing():
        for i, ep in enumerate(_episodes(5, nan_at=(3, 1))):
            if i == 3:
                raise RuntimeError("robot driver crashed")
            yield ep

    with pytest.raises(RuntimeError):
        write_episodes(out, "api", crashing(), val_fraction=0.2, progress=False)
    assert sorted(p.name for p in (out / ".work/api/units").iterdir()) == ["000000", "000001", "000002"]
    # a different episode 1 is refused, never mixed in
    other = list(_episodes(5, nan_at=(3, 1)))
    other[1] = next(_episodes(1, seed=9))
    with pytest.raises(ImportInputError, match="episode 1 differs"):
        write_episodes(out, "api", iter(other), val_fraction=0.2, progress=False)
    write_episodes(out, "api", _episodes(5, nan_at=(3, 1)), val_fraction=0.2, progress=False)
    tree = lambda r: {str(p.relative_to(r)): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}
    assert tree(out / "api") == tree(tmp_path / "ref" / "api")
    assert write_episodes(out, "api", _episodes(5, nan_at=(3, 1)), val_fraction=0.2, progress=False) == ref
    with pytest.raises(ImportInputError, match="overwrite=True"):
        write_episodes(out, "api", _episodes(5, seed=1), val_fraction=0.2, progress=False)


def test_api_bad_episodes(tmp_path):
    eps = list(_episodes(3))
    eps[1] = {**eps[1], "instruction": ""}
    eps[2] = {k: v for k, v in eps[2].items() if k != "action"}
    m = write_episodes(tmp_path, "api", iter(eps), val_fraction=0.0, progress=False)
    assert m["counts"]["splits"]["train"]["dropped_episodes"] == {"no_instruction": 1, "no_actions": 1}
    assert len(m["skipped"]) == 2
    with pytest.raises(ImportInputError, match="needs 7"):
        write_episodes(tmp_path, "api6", iter([{**eps[0], "action": np.zeros((4, 6))}]), progress=False)


def test_mixture_refuses_mixed_action_conventions(tmp_path):
    write_episodes(tmp_path, "ovla", _episodes(2), val_fraction=0.0, progress=False)
    write_episodes(tmp_path, "absolute", _episodes(2, seed=1), val_fraction=0.0, progress=False,
                   mapping={"convention": {"type": "absolute_eef"}})
    with pytest.raises(MixtureToolError) as e:
        plan_mixture(tmp_path, {"ovla": 1, "absolute": 1})
    msg = str(e.value)
    assert "absolute: absolute_eef" in msg and "ovla: delta_eef" in msg and "--allow-mixed-action-conventions" in msg
    plan = plan_mixture(tmp_path, {"ovla": 1, "absolute": 1}, allow_mixed_conventions=True)
    assert plan.action_conventions["absolute"].startswith("absolute_eef")
    assert plan_mixture(tmp_path, {"ovla": 1}).rows  # one convention: fine
    cmd = [sys.executable, "-m", "data_tools.mixture", "--data-dir", str(tmp_path), "--weights"]
    weights = tmp_path / "w.yaml"
    weights.write_text("ovla: 1\nabsolute: 1\n")
    p = subprocess.run(cmd + [str(weights), "--out", str(tmp_path / "m.yaml")], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "different action conventions" in p.stderr
    p = subprocess.run(cmd + [str(weights), "--out", str(tmp_path / "m.yaml"), "--allow-mixed-action-conventions"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_imported_datasets_join_the_mixture_under_its_recorded_rule(tmp_path):
    """vla-import writes OUT/mixture.yaml with the mixture tool's formula: a fresh OUT gets the default rule
    (balanced: shares ~ num_transitions), a later import re-plans with the recorded rule and weights, and the
    loader yields those shares; a file from before the record keeps its multipliers (and stays unrecorded)."""
    import yaml

    from data_tools.training_mixture import converted_datasets
    from llava_vla_plugin.core.training_data import load_data

    write_episodes(tmp_path, "short", _episodes(3, steps=3), val_fraction=0.0, progress=False)
    spec = yaml.safe_load((tmp_path / "mixture.yaml").read_text())
    assert spec["vla_mixture"]["weighting"] == "balanced" and spec["datasets"][0]["weight"] == 1.0
    write_episodes(tmp_path, "long", _episodes(3, seed=1, steps=9), val_fraction=0.0, progress=False)
    spec = yaml.safe_load((tmp_path / "mixture.yaml").read_text())
    assert spec["vla_mixture"]["weighting"] == "balanced"
    n = {k: d.num_transitions for k, d in converted_datasets(tmp_path).items()}
    assert n == {"short": 9, "long": 27}
    samples, _ = load_data(str(tmp_path / "mixture.yaml"))
    counts = {"short": 0, "long": 0}
    for s in samples:
        counts[s["dataset"]] += 1
    total = sum(counts.values())
    assert total == 36 and all(abs(counts[k] - n[k] / 36 * total) < 1 for k in n), counts
    # an OUT whose mixture.yaml predates the record: entries kept as they were, the new dataset joins with weight 1
    old = tmp_path / "old"
    write_episodes(old, "short", _episodes(3, steps=3), val_fraction=0.0, progress=False)
    (old / "mixture.yaml").write_text(yaml.safe_dump({"datasets": [
        {"json_path": str((old / "short/train.jsonl").resolve()), "sampling_strategy": "all", "weight": 2.5}]}))
    write_episodes(old, "long", _episodes(3, seed=1, steps=9), val_fraction=0.0, progress=False)
    spec = yaml.safe_load((old / "mixture.yaml").read_text())
    assert "vla_mixture" not in spec and [e["weight"] for e in spec["datasets"]] == [2.5, 1.0]
