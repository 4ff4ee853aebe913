"""data_tools.convert keeps the wrist camera and OpenVLA's proprio (issue 22 item 1), on fixtures with real OXE schemas.

Expected values are computed here by hand from the raw fixture (read back with tfds itself), following openvla
prismatic/vla/datasets/rlds/dataset.py make_dataset_from_rlds (restructure: image_obs_keys, state_obs_keys with a
1-wide zero column per None key, lines 141-168), oxe/transforms.py (the state keys the transform builds) and
utils/data_utils.py get_dataset_statistics (q01/q99 with np.quantile over every transition, lines 219-257).

- stanford_hydra: a wrist camera and a derived state (eef_state = state[:, :3] ++ state[:, 7:10], gripper_state =
  state[:, -3:-2], transforms.py:362-369); one step's wrist image is empty (OpenVLA's padding -> zero image).
- bridge_orig: no wrist camera; drop_first + relabel_from_state drop the first and last step (the proprio too).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_schemas_missing
from data_tools.converted_format import (
    PROPRIO_SOURCE_STATE,
    PROPRIO_SOURCE_UNKNOWN,
    PROPRIO_SOURCE_ZEROS,
    WRIST_IMAGES_DIR,
    ConvertedSample,
    EpisodeActions,
    proprio_padding,
    proprio_source,
    sample_wrist_image,
    wrist_image_path,
)
from llava_vla_plugin.apps.rlds_fixture import available_schemas, write_rlds_dataset

HYDRA = "stanford_hydra_dataset_converted_externally_to_rlds"
BRIDGE = "bridge_orig"
EMPTY_WRIST = (1, 2)  # (train episode, step) of HYDRA whose wrist image is stored empty


def _hydra_steps(ep: int, t: int, rng: np.random.Generator) -> dict:
    # a gripper command in [0, 1] (1 - g stays a valid unnormalized gripper for data_tools.validate)
    step = {"action": np.r_[rng.normal(0, 0.1, 6), rng.random()].astype(np.float32)}
    if (ep, t) == EMPTY_WRIST:
        step["observation"] = {"wrist_image": b""}
    return step


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    schemas = available_schemas()
    if HYDRA not in schemas or BRIDGE not in schemas:
        shared_schemas_missing(f"schemas {HYDRA} and {BRIDGE}")
    root = tmp_path_factory.mktemp("rlds")
    write_rlds_dataset(root, HYDRA, splits={"train": 6}, steps=(3, 5), image_size=(12, 16), seed=5,
                       step_fn=_hydra_steps)
    write_rlds_dataset(root, BRIDGE, splits={"train": 5, "val": 2}, steps=(3, 5), image_size=(12, 16), seed=6)
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    out = tmp_path_factory.mktemp("out")
    assert convert(root, [DatasetRequest(HYDRA), DatasetRequest(BRIDGE)], out, Registry.load(), RunOptions(),
                   progress=False) == {}
    return root, out


def _raw(root: Path, name: str) -> dict[str, list[dict]]:
    """{split: [episode: {"state": (T, S), "wrist": [bytes] or None}]} read with tfds, images undecoded."""
    import tensorflow_datasets as tfds

    b = tfds.builder_from_directory(str(next((root / name).iterdir())))
    skip = {k: tfds.decode.SkipDecoding() for k, v in b.info.features["steps"]["observation"].items()
            if isinstance(v, tfds.features.Image)}
    out = {}
    for split in b.info.splits.keys():
        eps = []
        for ex in tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False, decoders={"steps": {"observation": skip}})):
            steps = list(ex["steps"])
            obs = [s["observation"] for s in steps]
            eps.append({"state": np.stack([o["state"] for o in obs]).astype(np.float32),
                        "wrist": [o["wrist_image"] for o in obs] if "wrist_image" in obs[0] else None})
        out[split] = eps
    return out


def _lines(out: Path, name: str, split: str) -> list[dict]:
    return [json.loads(x) for x in (out / name / f"{split}.jsonl").read_text().splitlines()]


def _expected_proprio(name: str, state: np.ndarray) -> tuple[np.ndarray, int]:
    """(OpenVLA's proprio by hand, steps dropped at the start)."""
    zero = np.zeros((len(state), 1), np.float32)
    if name == HYDRA:  # state_obs_keys [eef_state, None, gripper_state]
        return np.concatenate([state[:, :3], state[:, 7:10], zero, state[:, -3:-2]], 1), 0
    # bridge_orig [EEF_state, None, gripper_state]; the transform drops step 0 and the last step
    p = np.concatenate([state[:, :6], zero, state[:, -1:]], 1)
    return p[1:-1], 1


def test_wrist_frames_are_the_stored_bytes(views):
    root, out = views
    raw = _raw(root, HYDRA)["train"]
    lines = _lines(out, HYDRA, "train") + _lines(out, HYDRA, "val")
    assert lines
    boundary = int(round(0.95 * len(raw)))  # no val split in the schema: OpenVLA's train[:95%] / train[95%:]
    n_wrist = 0
    for s in lines:
        stored = raw[s["episode"]]["wrist"][s["step"]]
        assert s["split"] == ("train" if s["episode"] < boundary else "val")
        if (s["episode"], s["step"]) == EMPTY_WRIST:  # padding: no file, no field; the reader's zero image
            assert "image_wrist" not in s and sample_wrist_image(s) is None
            assert not (out / wrist_image_path(HYDRA, s["split"], s["episode"], s["step"])).exists()
            continue
        assert s["image_wrist"] == wrist_image_path(HYDRA, s["split"], s["episode"], s["step"])
        assert s["image_wrist"] == f"{HYDRA}/{WRIST_IMAGES_DIR}/{s['split']}/{s['episode']:06d}/{s['step']:04d}.jpg"
        assert (out / s["image_wrist"]).read_bytes() == stored  # unchanged, unresized
        assert ConvertedSample.from_dict(s).image_wrist == s["image_wrist"]
        n_wrist += 1
    text = (out / HYDRA / "train.jsonl").read_text().splitlines(keepends=True)
    assert [ConvertedSample.from_dict(json.loads(x)).to_json_line() for x in text] == text  # round trip
    assert any((s["episode"], s["step"]) == EMPTY_WRIST for s in lines)
    views_m = json.loads((out / HYDRA / "manifest.json").read_text())["views"]
    assert views_m["primary"]["frames"] == len(lines)
    assert views_m["wrist"]["key"] == "wrist_image"
    assert (views_m["wrist"]["frames"], views_m["wrist"]["missing"]) == (n_wrist, 1)
    assert views_m["wrist"]["missing_why"] == {"missing_image": 1}
    assert "zero image" in views_m["wrist"]["rule"]


@pytest.mark.parametrize("name", [HYDRA, BRIDGE])
def test_proprio_is_openvla_concatenation_with_padding(views, name):
    root, out = views
    raw = _raw(root, name)
    for split in ("train", "val"):
        acts = EpisodeActions.load(out / name / f"{split}_actions.npz")
        prop = EpisodeActions.load(out / name / f"{split}_proprio.npz")
        np.testing.assert_array_equal(prop.episodes, acts.episodes)
        np.testing.assert_array_equal(prop.offsets, acts.offsets)
        np.testing.assert_array_equal(prop.steps, acts.steps)
        assert prop.actions.shape == (len(acts.actions), 8) and prop.absolute_mask.tolist() == [True] * 8
        source = raw["val"] if (name == BRIDGE and split == "val") else raw["train"]
        for ep in prop.episodes.tolist():
            p, steps = prop.episode(ep)
            want, first = _expected_proprio(name, source[ep]["state"])
            np.testing.assert_array_equal(p, want)
            assert steps.tolist() == list(range(first, first + len(want)))
            assert (p[:, 6] == 0).all()  # the None key's padding column
        # every sample's (episode, step) has its proprio row
        for s in _lines(out, name, split):
            _, steps = prop.episode(s["episode"])
            assert s["step"] in steps.tolist()


@pytest.mark.parametrize("name", [HYDRA, BRIDGE])
def test_proprio_statistics_as_openvla_with_proprio(views, name):
    root, out = views
    rows = []
    for eps in _raw(root, name).values():  # split="all", before skip_unlabeled, every transition
        for e in eps:
            rows.append(_expected_proprio(name, e["state"])[0])
    rows = np.concatenate(rows)
    stats = json.loads((out / name / "dataset_statistics.json").read_text())[name]
    p = stats["proprio"]
    assert p["source"] == PROPRIO_SOURCE_STATE and proprio_source(stats) == PROPRIO_SOURCE_STATE
    assert proprio_source(p) == PROPRIO_SOURCE_STATE
    for key, want in (("q01", np.quantile(rows, 0.01, axis=0)), ("q99", np.quantile(rows, 0.99, axis=0)),
                      ("mean", rows.mean(0)), ("std", rows.std(0)), ("min", rows.min(0)), ("max", rows.max(0))):
        np.testing.assert_allclose(p[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
    assert stats["num_transitions"] == len(rows)
    assert json.loads((out / "dataset_statistics.json").read_text())[name]["proprio"] == p
    m = json.loads((out / name / "manifest.json").read_text())["proprio"]
    assert m["written"] and m["dims"] == 8 and m["statistics_source"] == PROPRIO_SOURCE_STATE
    assert m["state_encoding"] == "POS_EULER"  # OpenVLA configs.py: both datasets' StateEncoding
    assert [k for k, _ in m["columns"]] == m["state_obs_keys"] and sum(w for _, w in m["columns"]) == 8
    # the None key's zero column (both registry entries: [eef 6, None, gripper 1]) is named for readers
    assert p["padding"] == [6] and proprio_padding(stats) == (6,) and not rows[:, 6].any()


def test_dataset_without_wrist(views):
    _, out = views
    lines = _lines(out, BRIDGE, "train") + _lines(out, BRIDGE, "val")
    assert lines and all("image_wrist" not in s and sample_wrist_image(s) is None for s in lines)
    assert not (out / BRIDGE / WRIST_IMAGES_DIR).exists()  # no black JPEGs: the reader applies the zero image
    w = json.loads((out / BRIDGE / "manifest.json").read_text())["views"]["wrist"]
    assert (w["key"], w["frames"], w["missing"], w["missing_why"]) == (None, 0, len(lines), {"no_camera": len(lines)})
    # the line of a frame without wrist is byte-identical to the format before views existed
    sample = ConvertedSample.from_dict(lines[0])
    assert sample.image_wrist is None
    assert sample.to_json_line() == (out / BRIDGE / "train.jsonl").read_text().splitlines(keepends=True)[0]


def test_zeros_statistics_and_old_folders_still_read(views, tmp_path):
    from data_tools.normalize import compute_statistics
    from data_tools.validate import validate

    _, out = views
    zeros = compute_statistics(np.ones((4, 7), np.float32), 1)  # no proprio: OpenVLA's load_proprio=False entry
    assert zeros["proprio"]["source"] == PROPRIO_SOURCE_ZEROS and zeros["proprio"]["q99"] == [0.0] * 7
    assert proprio_source(zeros) == PROPRIO_SOURCE_ZEROS
    # a folder as today's main wrote it: no image_wrist, no images_wrist/, no proprio npz, no `source`
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for name in (HYDRA, BRIDGE):
        shutil.rmtree(old / name / WRIST_IMAGES_DIR, ignore_errors=True)
        for f in (old / name).glob("*_proprio.npz"):
            f.unlink()
        for split in ("train", "val"):
            path = old / name / f"{split}.jsonl"
            kept = [{k: v for k, v in json.loads(x).items() if k != "image_wrist"} for x in path.read_text().splitlines()]
            path.write_text("".join(json.dumps(s) + "\n" for s in kept))
        for path in (old / name / "dataset_statistics.json", old / "dataset_statistics.json"):
            doc = json.loads(path.read_text())
            for entry in doc.values():
                entry["proprio"].pop("source", None)
                entry["proprio"] = {k: [0.0] * 7 for k in entry["proprio"]}
            path.write_text(json.dumps(doc))
    stats = json.loads((old / HYDRA / "dataset_statistics.json").read_text())[HYDRA]
    assert proprio_source(stats) == PROPRIO_SOURCE_UNKNOWN and proprio_source({}) == PROPRIO_SOURCE_UNKNOWN
    s = _lines(old, HYDRA, "train")[0]
    assert sample_wrist_image(s) is None and ConvertedSample.from_dict(s).image_wrist is None
    rep, summary = validate(old, decode=False)
    assert rep.ok, rep.problems
    rep, _ = validate(out, decode=True)  # the new files validate too (wrist paths and JPEGs checked)
    assert rep.ok, rep.problems


def test_version_1_folder_is_refused_not_mixed(views, tmp_path):
    """A dataset converted by the primary-only converter (version 1) is neither reused nor resumed into."""
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    root, out = views
    old = tmp_path / "out"
    shutil.copytree(out / BRIDGE, old / BRIDGE)
    manifest = json.loads((old / BRIDGE / "manifest.json").read_text())
    manifest.update(tool_version="data_tools.convert 1", fingerprint="0" * 64,
                    fingerprint_parts={**manifest["fingerprint_parts"], "options": "0" * 64})
    (old / BRIDGE / "manifest.json").write_text(json.dumps(manifest))
    failures = convert(root, [DatasetRequest(BRIDGE)], old, Registry.load(), RunOptions(), progress=False)
    assert "converter version: data_tools.convert 1 -> data_tools.convert 2" in failures[BRIDGE]
    assert json.loads((old / BRIDGE / "manifest.json").read_text())["tool_version"] == "data_tools.convert 1"  # untouched


def test_stats_from_keeps_published_actions_and_computes_proprio(views, tmp_path):
    """--stats-from: OpenVLA's published file has proprio over zeros (no `source`); the converted proprio's own
    statistics replace that entry, the action entry stays the published one."""
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    root, out = views
    computed = json.loads((out / BRIDGE / "dataset_statistics.json").read_text())[BRIDGE]
    published = json.loads(json.dumps(computed))
    published["proprio"] = {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")}
    published["action"]["q99"] = [v + 0.5 for v in published["action"]["q99"]]
    path = tmp_path / "published.json"
    path.write_text(json.dumps({BRIDGE: published}))
    assert convert(root, [DatasetRequest(BRIDGE)], tmp_path / "out", Registry.load(), RunOptions(stats_from=str(path)),
                   progress=False) == {}
    got = json.loads((tmp_path / "out" / BRIDGE / "dataset_statistics.json").read_text())[BRIDGE]
    assert got["action"]["q99"] == published["action"]["q99"]
    assert got["proprio"] == computed["proprio"] and proprio_source(got) == PROPRIO_SOURCE_STATE
