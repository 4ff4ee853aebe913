"""The synthetic RLDS writer must produce datasets that tfds reads like the real OXE ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from conftest import shared_schemas_missing  # noqa: E402
from llava_vla_plugin.apps import rlds_fixture as fx  # noqa: E402

BUNDLED = ["bridge_orig", "fractal20220817_data", "kuka", "language_table"]
SPLITS = {"train": 5, "val": 2}
SIZE = (24, 32)


def _shared_only() -> list[str]:
    shared = fx._external_schema_root()
    return [] if shared is None else sorted(set(fx._scan(shared)) - set(BUNDLED))


def _instruction(step: dict) -> str:
    """The instruction of a step, wherever the schema keeps it."""
    obs = step.get("observation", {})
    for holder, key in ((step, "language_instruction"), (obs, "natural_language_instruction")):
        if key in holder:
            return holder[key].decode()
    codes = obs["instruction"]  # language_table: NUL-padded UTF-8
    return bytes(codes[codes != 0].astype(np.uint8)).decode()


def _images(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(_images(value, f"{prefix}{key}/"))
        elif isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[:2] == SIZE:
            found[prefix + key] = value
    return found


def _read(path: Path, split: str) -> list[list[dict]]:
    builder = tfds.builder_from_directory(path)
    return [list(ep["steps"]) for ep in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))]


def _check(name: str, root: Path) -> None:
    path = fx.write_rlds_dataset(
        root, name, splits=SPLITS, steps=(2, 4), shards=2, image_size=SIZE, empty_instruction_episodes=[1]
    )
    info = fx.schema_info(name)
    assert path == root / name / info["version"]
    builder = tfds.builder_from_directory(path)
    assert builder.info.name == info["name"]
    for split, count in SPLITS.items():
        assert builder.info.splits[split].num_examples == count
        assert builder.info.splits[split].num_shards == 2
        assert len(list(path.glob(f"{info['name']}-{split}.tfrecord-*-of-00002"))) == 2
        episodes = _read(path, split)
        assert len(episodes) == count
        for index, steps in enumerate(episodes):
            assert 2 <= len(steps) <= 4
            assert [bool(s["is_first"]) for s in steps] == [True] + [False] * (len(steps) - 1)
            assert [bool(s["is_last"]) for s in steps] == [False] * (len(steps) - 1) + [True]
            images = _images(steps[0])
            assert images, "no image of the requested size"
            assert all(img.dtype in (np.uint8, np.uint16, np.float32) for img in images.values())
            text = _instruction(steps[0])
            assert (text == "") == (split == "train" and index == 1), (split, index, text)
    # recorded sizes match the files: numBytes is the serialized example bytes (+16 framing each)
    written = json.loads((path / "dataset_info.json").read_text())
    for split in written["splits"]:
        files = sorted(path.glob(f"{info['name']}-{split['name']}.tfrecord-*"))
        records = sum(int(n) for n in split["shardLengths"])
        assert sum(f.stat().st_size for f in files) == int(split["numBytes"]) + 16 * records


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_schemas_roundtrip(name: str, tmp_path: Path) -> None:
    assert name in fx.available_schemas()
    _check(name, tmp_path)


_NO_SHARED = pytest.param(None, id="shared-schemas")


@pytest.mark.parametrize("name", _shared_only() or [_NO_SHARED])
def test_shared_schemas_roundtrip(name: str | None, tmp_path: Path) -> None:
    if name is None:
        shared_schemas_missing("the shared-schema round trip")
    _check(name, tmp_path)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    kwargs = dict(splits={"train": 3}, steps=(2, 5), shards=2, image_size=SIZE)
    a = fx.write_rlds_dataset(tmp_path / "a", "bridge_orig", seed=3, **kwargs)
    b = fx.write_rlds_dataset(tmp_path / "b", "bridge_orig", seed=3, **kwargs)
    c = fx.write_rlds_dataset(tmp_path / "c", "bridge_orig", seed=4, **kwargs)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) == sorted(p.name for p in c.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    shards = [f for f in files if ".tfrecord-" in f]
    assert all((a / f).read_bytes() != (c / f).read_bytes() for f in shards)


def test_schema_image_size_and_shard_spread(tmp_path: Path) -> None:
    path = fx.write_rlds_dataset(tmp_path, "language_table", splits={"train": 5, "val": 1}, steps=1,
                                 shards={"train": 3})
    builder = tfds.builder_from_directory(path)
    assert list(builder.info.splits["train"].shard_lengths) == [2, 2, 1]
    assert list(builder.info.splits["val"].shard_lengths) == [1]
    (steps,) = _read(path, "train[:1]")
    assert steps[0]["observation"]["rgb"].shape == (360, 640, 3)
    assert bool(steps[0]["is_terminal"])


def test_step_fn_and_custom_names(tmp_path: Path) -> None:
    def step_fn(episode: int, step: int, rng: np.random.Generator) -> dict:
        return {"action": np.full(7, episode * 10 + step, np.float32), "observation": {"state": np.ones(7, np.float32)}}

    path = fx.write_rlds_dataset(
        tmp_path, "my_bridge", "9.9.9", schema="bridge_orig", splits={"train": 2}, steps=3,
        image_size=SIZE, tfds_name="fake_bridge", step_fn=step_fn,
    )
    assert path == tmp_path / "my_bridge" / "9.9.9"
    assert (path / "fake_bridge-train.tfrecord-00000-of-00001").is_file()
    episodes = _read(path, "train")
    assert [[float(s["action"][0]) for s in ep] for ep in episodes] == [[0, 1, 2], [10, 11, 12]]
    assert all((s["observation"]["state"] == 1).all() for ep in episodes for s in ep)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown schema"):
        fx.write_rlds_dataset(tmp_path, "no_such_dataset")
    with pytest.raises(ValueError, match="shards"):
        fx.write_rlds_dataset(tmp_path, "kuka", splits={"train": 1}, shards=2)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        fx.main(["--help"])
    assert exit_info.value.code == 0
    rc = fx.main([str(tmp_path), "--schema", "kuka", "--episodes", "3", "--steps", "2-3", "--shards", "3",
                  "--image-size", "16x20", "--seed", "1"])
    assert rc == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == tmp_path / "kuka" / "0.1.0"
    assert len(list(out.glob("kuka-train.tfrecord-*-of-00003"))) == 3
    assert fx.main([str(tmp_path), "--schema", "nope"]) == 2
