"""data_tools.convert as a command: determinism across --workers, resume after a kill, bad input, options.
Only bundled schemas (always available) are used."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_convert(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "data_tools.convert", "--no-progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# A hard kill after the n-th parsed episode, injected from outside production code: the converter runs in a
# child process whose `parse_episode` is wrapped (workers=1, so every episode is parsed in that process).
_KILL_AFTER = """
import os, sys
import data_tools.convert as c
n, real = int(sys.argv[1]), c.parse_episode
seen = [0]
def parse_then_die(*a, **k):
    seen[0] += 1
    if seen[0] > n:
        os._exit(17)  # simulated kill -9: no cleanup, no atexit
    return real(*a, **k)
c.parse_episode = parse_then_die
sys.exit(c.main(sys.argv[2:]))
"""


def run_convert_killed_after(episodes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-c", _KILL_AFTER, str(episodes), "--no-progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def tree(out: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "mixture.yaml":  # holds absolute json paths
                data = data.replace(str(out.resolve()).encode(), b"OUT")
            files[str(p.relative_to(out))] = data
    return files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlds")
    write_rlds_dataset(root, "bridge_orig", splits={"train": 9, "val": 3}, steps=(2, 6), shards=3, image_size=(12, 16))
    write_rlds_dataset(root, "fractal20220817_data", splits={"train": 12}, steps=(2, 5), shards=3, image_size=(12, 16),
                       empty_instruction_episodes=[4])
    return root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run_convert("--data-dir", str(data), "--datasets", "bridge_orig,fractal20220817_data", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_byte_identical_for_any_worker_count(data, reference, tmp_path):
    out = tmp_path / "out"
    r = run_convert("--data-dir", str(data), "--datasets", "bridge_orig,fractal20220817_data", "--out", str(out),
                    "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert tree(out) == tree(reference)
    assert not (out / ".work").exists()


def test_resume_after_kill(data, reference, tmp_path):
    out = tmp_path / "out"
    args = ("--data-dir", str(data), "--datasets", "bridge_orig,fractal20220817_data", "--out", str(out))
    killed = run_convert_killed_after(7, *args)
    assert killed.returncode == 17
    assert not (out / "bridge_orig").exists()  # nothing final from an unfinished dataset
    assert any((out / ".work" / "bridge_orig" / "units").glob("*.tmp"))  # killed mid-unit
    assert any(p.name.endswith("-00000") for p in (out / ".work" / "bridge_orig" / "units").iterdir())
    resumed = run_convert(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert tree(out) == tree(reference)
    again = run_convert(*args)  # a finished run is a no-op
    assert again.returncode == 0 and "already converted" in again.stderr


def test_corrupt_shard_names_file_and_record_others_still_converted(data, tmp_path):
    import shutil

    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard = sorted((bad / "fractal20220817_data").rglob("*train.tfrecord-00001-of-00003"))[0]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) - 100])  # truncate the last record
    out = tmp_path / "out"
    r = run_convert("--data-dir", str(bad), "--datasets", "fractal20220817_data,bridge_orig", "--out", str(out))
    assert r.returncode == 1
    assert shard.name in r.stderr and "record 3" in r.stderr
    assert (out / "bridge_orig" / "train.jsonl").is_file()
    assert not (out / "fractal20220817_data").exists()
    assert not (out / "mixture.yaml").exists()


def test_unknown_dataset(data, tmp_path):
    r = run_convert("--data-dir", str(data), "--datasets", "bridge_orgi", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "unknown dataset 'bridge_orgi'" in r.stderr and "bridge_orig" in r.stderr and "--registry" in r.stderr


def test_help():
    r = subprocess.run([sys.executable, "-m", "data_tools.convert", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--frames-per-episode" in r.stdout and "--stats-from" in r.stdout


def _samples(out: Path, name: str, split: str = "train") -> list[dict]:
    return [json.loads(x) for x in (out / name / f"{split}.jsonl").read_text().splitlines()]


def test_frames_per_episode_seeded(data, reference, tmp_path):
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    outs = {}
    for tag, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / tag
        assert convert(data, [DatasetRequest("fractal20220817_data")], out, Registry.load(),
                       RunOptions(frames_per_episode=2, seed=seed), progress=False) == {}
        outs[tag] = [(s["episode"], s["step"]) for s in _samples(out, "fractal20220817_data")]
    full = [(s["episode"], s["step"]) for s in _samples(reference, "fractal20220817_data")]
    assert outs["a"] == outs["b"] != outs["c"]
    assert set(outs["a"]) <= set(full)
    per_ep = {}
    for ep, _ in outs["a"]:
        per_ep[ep] = per_ep.get(ep, 0) + 1
    assert max(per_ep.values()) == 2 and set(per_ep) == {ep for ep, _ in full}
    # statistics still cover every transition
    st_a = json.loads((tmp_path / "a" / "fractal20220817_data" / "dataset_statistics.json").read_text())
    st_ref = json.loads((reference / "fractal20220817_data" / "dataset_statistics.json").read_text())
    assert st_a == st_ref


def test_stats_from_published_file(data, tmp_path):
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    published = {"fractal20220817_data": {
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "max": [1.0] * 6 + [1.0], "min": [-1.0] * 6 + [0.0],
                   "q01": [-0.2] * 6 + [0.0], "q99": [0.2] * 6 + [1.0], "mask": [True] * 7},
        "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
        "num_transitions": 123, "num_trajectories": 7}}
    path = tmp_path / "dataset_statistics.json"
    path.write_text(json.dumps(published))
    out = tmp_path / "out"
    assert convert(data, [DatasetRequest("fractal20220817_data")], out, Registry.load(),
                   RunOptions(stats_from=str(path)), progress=False) == {}
    st = json.loads((out / "fractal20220817_data" / "dataset_statistics.json").read_text())["fractal20220817_data"]
    assert st["num_transitions"] == 123
    assert st["action"]["mask"] == [True] * 6 + [False]  # OpenVLA overrides the mask from the dataset config
    for s in _samples(out, "fractal20220817_data"):
        raw, got = np.array(s["action_raw"]), np.array(s["conversations"][1]["value"])
        want = np.clip(2 * (raw[:6] + 0.2) / 0.4 - 1, -1, 1)
        np.testing.assert_allclose(got[:6], want, atol=1e-5)
        assert got[6] == raw[6]


def test_bgr_flip_reencodes_only_when_asked(data, reference, tmp_path):
    from PIL import Image

    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - name: fractal20220817_data\n    version: 0.1.0\n    weight: 2.5\n"
                   "    flip_image_channels: true\n")
    out = tmp_path / "out"
    r = run_convert("--data-dir", str(data), "--mixture", str(mix), "--out", str(out))
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "fractal20220817_data" / "manifest.json").read_text())
    assert set(m["counts"]["splits"]["train"]["images"]) == {"flipped"}
    assert "weight: 2.5" in (out / "mixture.yaml").read_text()
    s = _samples(out, "fractal20220817_data")[0]
    flipped = np.asarray(Image.open(out / s["image"]), np.float64)
    original = np.asarray(Image.open(reference / s["image"]), np.float64)
    assert np.abs(flipped - original[..., ::-1]).mean() < np.abs(flipped - original).mean()
    ref_m = json.loads((reference / "fractal20220817_data" / "manifest.json").read_text())
    assert set(ref_m["counts"]["splits"]["train"]["images"]) == {"copied"}


def test_png_and_raw_sources_encoded_once_as_jpeg():
    from PIL import Image

    from data_tools.images import ImageDecodeError, frame_jpeg

    pixels = (np.arange(8 * 8 * 3) % 255).astype(np.uint8).reshape(8, 8, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    data, how = frame_jpeg(buf.getvalue(), flip_channels=False)
    assert how == "encoded" and data[:3] == b"\xff\xd8\xff"
    data, how = frame_jpeg(pixels, flip_channels=False)
    assert how == "encoded" and Image.open(io.BytesIO(data)).size == (8, 8)
    with pytest.raises(ImageDecodeError):
        frame_jpeg(b"not an image", flip_channels=True)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    assert frame_jpeg(jpeg.getvalue(), flip_channels=False) == (jpeg.getvalue(), "copied")


def test_custom_dataset_registered_by_yaml(tmp_path):
    root = tmp_path / "data"
    write_rlds_dataset(root, "my_robot", schema="kuka", tfds_name="my_robot", splits={"train": 3}, steps=3,
                       image_size=(12, 16))
    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "datasets:\n"
        "  my_robot:\n"
        "    images: {primary: image}\n"
        "    language: {key: observation/natural_language_instruction}\n"
        "    standardize:\n"
        "      - action:\n"
        "          - {key: action/world_vector}\n"
        "          - {key: action/rotation_delta}\n"
        "          - {key: action/gripper_closedness_action, ops: [{clip: [0, 1]}]}\n"
    )
    mix = tmp_path / "mix.yaml"
    mix.write_text("datasets:\n  - name: my_robot\n    weight: 3\n")
    out = tmp_path / "out"
    r = run_convert("--data-dir", str(root), "--mixture", str(mix), "--registry", str(extra), "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = (out / "my_robot" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[0])["id"] == "my_robot/train/000000/0000"
    assert "weight: 3.0" in (out / "mixture.yaml").read_text()


def test_kuka_success_filter(tmp_path):
    import tensorflow_datasets as tfds

    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    root = tmp_path / "data"
    for seed in range(20):  # the fixture draws success per episode; take a seed with both outcomes
        d = write_rlds_dataset(root, "kuka", splits={"train": 8}, steps=3, image_size=(12, 16), seed=seed)
        success = [bool(ex["success"]) for ex in tfds.as_numpy(
            tfds.builder_from_directory(str(d)).as_dataset(split="train", shuffle_files=False,
                                                           decoders={"steps": tfds.decode.SkipDecoding()}))]
        if 0 < sum(success) < len(success):
            break
    assert 0 < sum(success) < len(success)
    out = tmp_path / "out"
    assert convert(root, [DatasetRequest("kuka", filter_success=True)], out, Registry.load(), RunOptions(),
                   progress=False) == {}
    lines = [json.loads(x) for s in ("train", "val") for x in (out / "kuka" / f"{s}.jsonl").read_text().splitlines()]
    assert {s["episode"] for s in lines} == {i for i, ok in enumerate(success) if ok}
    st = json.loads((out / "kuka" / "dataset_statistics.json").read_text())["kuka"]
    assert st["num_trajectories"] == sum(success) and st["num_transitions"] == 3 * sum(success)
    m = json.loads((out / "kuka" / "manifest.json").read_text())
    dropped = sum(m["counts"]["splits"][s]["dropped_episodes"].get("filter_success", 0) for s in ("train", "val"))
    assert dropped == len(success) - sum(success) and m["options"]["filter_success"] is True


def test_rerun_with_other_options_needs_overwrite(data, tmp_path):
    out = tmp_path / "out"
    base = ("--data-dir", str(data), "--datasets", "fractal20220817_data", "--out", str(out))
    assert run_convert(*base).returncode == 0
    r = run_convert(*base, "--frames-per-episode", "1")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    r = run_convert(*base, "--frames-per-episode", "1", "--overwrite")
    assert r.returncode == 0, r.stderr
    lines = (out / "fractal20220817_data" / "train.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["episode"] for x in lines})


def test_datasets_without_primary_camera_or_statistics_fail_early(data, tmp_path):
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    failures = convert(data, [DatasetRequest("nyu_door_opening_surprising_effectiveness")], tmp_path / "a",
                       Registry.load(), RunOptions(), progress=False)
    assert "no primary camera" in failures["nyu_door_opening_surprising_effectiveness"]
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"bridge_orig": {"action": {}}}))
    failures = convert(data, [DatasetRequest("fractal20220817_data")], tmp_path / "b", Registry.load(),
                       RunOptions(stats_from=str(stats)), progress=False)
    assert "no statistics for 'fractal20220817_data'" in failures["fractal20220817_data"]
    assert not (tmp_path / "b" / "fractal20220817_data").exists()
