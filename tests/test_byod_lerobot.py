"""vla-import lerobot on datasets written by LeRobot's own writer (tests/fixtures/lerobot_v21 by lerobot 0.3.3,
lerobot_v30 by lerobot 0.4.4; tests/fixtures/make_lerobot_fixtures.py), then data_tools.validate on the output.

Bad input is made from those real files from outside the importer: a column dropped from a parquet (pyarrow),
a video swapped for a shorter episode's, NaN written into an action, a task string emptied, an fps changed.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import ROOT, subprocess_env
from data_tools.byod import ImportInputError, ImportOptions, import_source
from data_tools.converted_format import EpisodeActions, episode_actions_file, episode_proprio_file
from data_tools.import_lerobot import DEFAULTS, LeRobotSource
from data_tools.normalize import compute_statistics, normalize_bounds_q99
from data_tools.validate import validate

FIX = ROOT / "tests" / "fixtures"
TASKS = ["pick up the red block", "open the drawer", "push the cup to the left"]


def _import(src: Path, out: Path, name: str, **opts):
    source = LeRobotSource(src, DEFAULTS)
    return import_source(source, out, name, source.mapping, ImportOptions(progress=False, **opts))


def _samples(out: Path, name: str) -> list[dict]:
    return [json.loads(l) for s in ("train", "val") for l in (out / name / f"{s}.jsonl").read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "mixture.yaml"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("lerobot_out")
    manifests = {v: _import(FIX / f"lerobot_{v}", out, f"lr_{v}", val_fraction=0.34) for v in ("v21", "v30")}
    return out, manifests


@pytest.mark.parametrize("version", ["v21", "v30"])
def test_import_matches_what_lerobot_wrote(imported, version):
    out, manifests = imported
    name = f"lr_{version}"
    report, summary = validate(out)
    assert report.ok, dict(report.problems)
    expected = np.load(FIX / f"lerobot_{version}_expected.npz")
    samples = _samples(out, name)
    # 3 episodes; OpenVLA's rounding of train[:66%] keeps episodes 0-1 for train, 2 for val
    assert [(s["split"], s["episode"]) for s in samples] == [("train", 0)] * 6 + [("train", 1)] * 5 + [("val", 2)] * 7
    assert summary[name] == {"train": 11, "val": 7}
    all_actions = np.concatenate([expected[f"action_{e}"] for e in range(3)])
    stats = json.loads((out / name / "dataset_statistics.json").read_text())[name]
    all_states = np.concatenate([expected[f"state_{e}"] for e in range(3)]).astype(np.float32)
    # the proprio entry over the kept state (OpenVLA with load_proprio=True): PROPRIO=1 trains on imported data
    assert stats == compute_statistics(all_actions, 3, (True,) * 6 + (False,), proprio=all_states)
    for s in samples:
        e, t = s["episode"], s["step"]
        assert s["instruction"] == TASKS[e]
        np.testing.assert_array_equal(np.float32(s["action_raw"]), expected[f"action_{e}"][t])
        # AV1 (LeRobot's default codec) then JPEG q95: close to the written pixels, not equal
        img = np.asarray(Image.open(out / s["image"]).convert("RGB"), np.int16)
        assert img.shape == (32, 32, 3)
        assert np.abs(img - expected[f"front_{e}"][t]).mean() < 8, (e, t)
    train = EpisodeActions.load(out / name / episode_actions_file("train"))
    acts, steps = train.episode(1)
    np.testing.assert_array_equal(acts, normalize_bounds_q99(expected["action_1"], stats))
    assert steps.tolist() == list(range(5))
    proprio = EpisodeActions.load(out / name / episode_proprio_file("val"))
    np.testing.assert_array_equal(proprio.episode(2)[0], expected["state_2"])
    m = manifests[version]
    assert m["source"]["codebase_version"] == {"v21": "v2.1", "v30": "v3.0"}[version]
    assert m["source"]["images"] == {"reencoded": True, "from": "video decoded with PyAV", "jpeg_quality": 95}
    assert m["source"]["views_not_exported"] == ["observation.images.wrist"]
    assert m["unnorm_key"] == name and m["action_convention"] == {"type": "delta_eef", "gripper_open": 1.0, "gripper_closed": 0.0}
    assert json.loads((out / "dataset_statistics.json").read_text()).keys() == {"lr_v21", "lr_v30"}


def test_v21_and_v30_give_the_same_samples(imported):
    out, _ = imported
    a = [{**s, "id": s["id"][7:], "image": s["image"][7:], "dataset": None} for s in _samples(out, "lr_v21")]
    b = [{**s, "id": s["id"][7:], "image": s["image"][7:], "dataset": None} for s in _samples(out, "lr_v30")]
    assert a == b


def test_byte_identical_for_any_worker_count(imported, tmp_path):
    out, _ = imported
    _import(FIX / "lerobot_v30", tmp_path / "w2", "lr_v30", val_fraction=0.34, workers=2)
    assert _tree(tmp_path / "w2" / "lr_v30") == _tree(out / "lr_v30")


def _copy(version: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"src_{version}"
    shutil.copytree(FIX / f"lerobot_{version}", dst)
    return dst


def _rewrite_parquet(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def test_missing_column_names_file_episode_and_key(tmp_path):
    src = _copy("v30", tmp_path)
    data = src / "data/chunk-000/file-000.parquet"
    _rewrite_parquet(data, lambda t: t.drop_columns(["action"]))
    with pytest.raises(ImportInputError) as e:
        _import(src, tmp_path / "out", "bad")
    assert str(data) in str(e.value) and "episode 0" in str(e.value) and "'action'" in str(e.value)
    assert not (tmp_path / "out" / "bad").exists()


def test_video_shorter_than_its_parquet_is_an_error(tmp_path):
    src = _copy("v21", tmp_path)
    videos = src / "videos/chunk-000/observation.images.front"
    shutil.copy(videos / "episode_000001.mp4", videos / "episode_000002.mp4")  # 5 frames for 7 rows
    with pytest.raises(ImportInputError) as e:
        _import(src, tmp_path / "out", "short")
    msg = str(e.value)
    assert "episode 2" in msg and "episode_000002.mp4" in msg and "shorter than its parquet" in msg
    assert "observation.images.front" in msg


def test_timestamps_off_the_frame_rate_are_reported_not_shifted(tmp_path):
    src = _copy("v21", tmp_path)
    data = src / "data/chunk-000/episode_000001.parquet"

    def shift(t):
        ts = t["timestamp"].to_numpy().copy()
        ts[3] += 0.05
        return t.set_column(t.column_names.index("timestamp"), "timestamp", pa.array(ts, pa.float32()))

    _rewrite_parquet(data, shift)
    with pytest.raises(ImportInputError) as e:
        _import(src, tmp_path / "out", "ts")
    assert str(data) in str(e.value) and "episode 1" in str(e.value) and "'timestamp'" in str(e.value)
    assert "row 3" in str(e.value)


def test_nan_action_frames_are_skipped_counted_and_listed(tmp_path):
    src = _copy("v21", tmp_path)
    data = src / "data/chunk-000/episode_000000.parquet"

    def poison(t):
        rows = t["action"].to_pylist()
        rows[2][4] = float("nan")
        return t.set_column(t.column_names.index("action"), "action", pa.array(rows, t.schema.field("action").type))

    _rewrite_parquet(data, poison)
    out = tmp_path / "out"
    m = _import(src, out, "nan")
    assert m["counts"]["splits"]["train"]["dropped_frames"] == {"nonfinite_action": 1}
    assert m["counts"]["num_transitions"] == 17
    assert m["skipped_frames"] == [f"{data}: episode 0 step 2"]
    assert [s["step"] for s in _samples(out, "nan") if s["episode"] == 0] == [0, 1, 3, 4, 5]
    assert validate(out)[0].ok


def test_episode_without_task_is_skipped_counted_and_listed(tmp_path):
    src = _copy("v21", tmp_path)
    tasks = src / "meta/tasks.jsonl"
    lines = [json.loads(l) for l in tasks.read_text().splitlines()]
    lines[1]["task"] = ""
    tasks.write_text("".join(json.dumps(l) + "\n" for l in lines))
    episodes = src / "meta/episodes.jsonl"
    eps = [json.loads(l) for l in episodes.read_text().splitlines()]
    eps[1]["tasks"] = []
    episodes.write_text("".join(json.dumps(l) + "\n" for l in eps))
    out = tmp_path / "out"
    m = _import(src, out, "notask")
    assert m["counts"]["splits"]["train"]["dropped_episodes"] == {"no_task": 1}
    assert len(m["skipped"]) == 1 and "episode 1" in m["skipped"][0] and "no_task" in m["skipped"][0]
    assert {s["episode"] for s in _samples(out, "notask")} == {0, 2}
    assert validate(out)[0].ok


class _Killed(BaseException):
    """Stands for kill -9 in-process: not an Exception, so nothing in the importer catches it."""


def test_interrupted_import_resumes_without_touching_finished_work(imported, tmp_path, monkeypatch):
    out_ref, _ = imported
    out = tmp_path / "out"
    real, seen = LeRobotSource.load, [0]

    def load(self, ref):
        seen[0] += 1
        if seen[0] > 2:
            raise _Killed()
        return real(self, ref)

    monkeypatch.setattr(LeRobotSource, "load", load)
    with pytest.raises(_Killed):
        _import(FIX / "lerobot_v30", out, "lr_v30", val_fraction=0.34)
    units = out / ".work" / "lr_v30" / "units"
    done = sorted(p.name for p in units.iterdir())
    assert done == ["000000", "000001"] and not (out / "lr_v30").exists()
    before = {p: p.stat().st_mtime_ns for p in units.rglob("*") if p.is_file()}
    # a changed option is refused, the partial run left as it was
    with pytest.raises(ImportInputError, match="partial import made from other inputs"):
        _import(FIX / "lerobot_v30", out, "lr_v30", val_fraction=0.5)
    assert {p: p.stat().st_mtime_ns for p in units.rglob("*") if p.is_file()} == before
    calls = []
    monkeypatch.setattr(LeRobotSource, "load", lambda self, ref: calls.append(ref.episode_index) or real(self, ref))
    _import(FIX / "lerobot_v30", out, "lr_v30", val_fraction=0.34)
    assert calls == [2]  # only the episode the killed run had not finished
    assert _tree(out / "lr_v30") == _tree(out_ref / "lr_v30")
    # rerun: already imported, nothing to do; changed options need --overwrite
    _import(FIX / "lerobot_v30", out, "lr_v30", val_fraction=0.34)
    assert calls == [2]
    with pytest.raises(ImportInputError, match="--overwrite"):
        _import(FIX / "lerobot_v30", out, "lr_v30", val_fraction=0.5)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_tools.import_cli", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_follows_the_flag_convention():
    from data_tools.import_cli import build_parser

    parser = build_parser()
    for sub in ("lerobot", "hdf5"):
        action = next(a for a in parser._actions if getattr(a, "choices", None) and sub in a.choices)
        options = {s for a in action.choices[sub]._actions for s in a.option_strings}
        assert {"--out", "--data-dir", "--no-progress", "-v", "--verbose", "-h", "--workers", "--mapping"} <= options


def test_cli_exit_codes_and_mapping(tmp_path):
    assert _cli("--help").returncode == 0 and _cli("lerobot", "--help").returncode == 0
    assert _cli("lerobot", str(tmp_path / "nope"), "--out", str(tmp_path / "o")).returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("views: {primary: observation.images.top}\n")
    p = _cli("lerobot", str(FIX / "lerobot_v21"), "--out", str(tmp_path / "o"), "--mapping", str(bad))
    assert p.returncode == 2 and "observation.images.top" in p.stderr and "observation.images.front" in p.stderr
    src = _copy("v30", tmp_path)
    _rewrite_parquet(src / "data/chunk-000/file-000.parquet", lambda t: t.drop_columns(["observation.state", "action"]))
    p = _cli("lerobot", str(src), "--out", str(tmp_path / "o"), "--no-progress")
    assert p.returncode == 1 and "'action'" in p.stderr, p.stderr
    good = tmp_path / "wrist.yaml"
    good.write_text("views: {primary: observation.images.wrist}\njpeg_quality: 80\nstate: null\n")
    p = _cli("lerobot", str(FIX / "lerobot_v30"), "--out", str(tmp_path / "o"), "--name", "wrist", "--mapping", str(good),
             "--no-progress")
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "o/wrist/manifest.json").read_text())
    assert m["source"]["primary_view"] == "observation.images.wrist" and m["source"]["images"]["jpeg_quality"] == 80
    assert not (tmp_path / "o/wrist/train_proprio.npz").exists()


def test_image_features_stored_in_the_parquet(tmp_path):
    """LeRobot "image" features (PNG bytes inside the parquet, written by lerobot 0.4.4 with use_videos=False)."""
    m = _import(FIX / "lerobot_v30_images", tmp_path, "imgs", val_fraction=0.0)
    assert validate(tmp_path)[0].ok
    assert m["counts"]["splits"]["train"]["images"] == {"encoded": 5}  # PNG -> JPEG q95 (a stored JPEG is copied)
    assert m["source"]["images"]["reencoded"] is True and m["source"]["images"]["from"] == "parquet image bytes"
    expected = np.load(FIX / "lerobot_v30_images_expected.npz")
    for s in _samples(tmp_path, "imgs"):
        img = np.asarray(Image.open(tmp_path / s["image"]).convert("RGB"), np.int16)
        assert np.abs(img - expected[f"front_{s['episode']}"][s["step"]]).mean() < 4
        np.testing.assert_array_equal(np.float32(s["action_raw"]), expected[f"action_{s['episode']}"][s["step"]])
