"""data_tools.convert under faults and bad input (issue 11 "Conversion", issue 10 defect 2).

Each test injects the fault from outside production code: a replaced source, a failed write (the atomic
writer's `open` made to fail with ENOSPC, or a real RLIMIT_FSIZE on the process), damaged JPEG bytes and
an `<image>` instruction written into real TFRecord fixtures. Only bundled schemas are used.
"""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools import atomic
from data_tools.convert import DatasetRequest, RunOptions, convert
from data_tools.images import jpeg_structure_problem, verify_decodes
from data_tools.registry import Registry
from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

ROOT = Path(__file__).resolve().parents[1]
FRACTAL = "fractal20220817_data"


def _jpeg(seed: int = 0, size: tuple[int, int] = (12, 16)) -> bytes:
    px = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


GOOD = _jpeg()
TRUNCATED = GOOD[: len(GOOD) * 2 // 3]
ZERO_FILLED = GOOD[:200] + bytes(len(GOOD) - 200)  # a valid header followed by zeros
TRAILING = GOOD + bytes(64)  # zero padding after end-of-image
NO_PIXELS = b"\xff\xd8" + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\xff\xd9"  # well framed


def tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("mixture.yaml",)}


def _convert(root: Path, out: Path, names=(FRACTAL,), registry: Registry | None = None, **opts) -> dict[str, str]:
    return convert(root, [DatasetRequest(n) for n in names], out, registry or Registry.load(), RunOptions(**opts),
                   progress=False)


def _run_cli(*args: str, cwd: Path = ROOT, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "data_tools.convert", "--no-progress", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


class _Killed(BaseException):
    """Stands for kill -9 in-process: not an Exception, so nothing in convert catches it."""


def _die_after(monkeypatch, n: int) -> None:
    import data_tools.convert as c

    real, seen = c.parse_episode, [0]

    def parse(*a, **k):
        seen[0] += 1
        if seen[0] > n:
            raise _Killed()
        return real(*a, **k)

    monkeypatch.setattr(c, "parse_episode", parse)


# ----------------------------------------------------------------------------------------------
# The source fingerprint


def _fractal(root: Path, seed: int) -> Path:
    return write_rlds_dataset(root, FRACTAL, splits={"train": 6}, steps=(2, 4), shards=2, image_size=(12, 16),
                              seed=seed)


def test_replaced_source_is_refused_not_skipped_or_mixed(tmp_path, monkeypatch):
    root, out = tmp_path / "data", tmp_path / "out"
    src = _fractal(root, seed=1)
    shard_names = sorted(p.name for p in src.glob("*.tfrecord*"))
    assert _convert(root, out) == {}
    first = tree(out / FRACTAL)

    _fractal(root, seed=2)  # another dataset with the same shard names and counts
    assert sorted(p.name for p in src.glob("*.tfrecord*")) == shard_names
    failures = _convert(root, out)
    assert "source data" in failures[FRACTAL] and "--overwrite" in failures[FRACTAL]
    assert tree(out / FRACTAL) == first  # the old output is kept, not silently relabelled
    assert convert(root, [DatasetRequest(FRACTAL)], out, Registry.load(), RunOptions(), overwrite=True,
                   progress=False) == {}
    assert tree(out / FRACTAL) != first

    # a partial run (killed after 3 episodes) is not resumed over a changed source
    out2 = tmp_path / "out2"
    _die_after(monkeypatch, 3)
    with pytest.raises(_Killed):
        _convert(root, out2)
    monkeypatch.undo()
    assert (out2 / ".work" / FRACTAL / "plan.json").is_file()
    _fractal(root, seed=3)
    failures = _convert(root, out2)
    assert "partial run" in failures[FRACTAL] and "source data" in failures[FRACTAL]
    assert not (out2 / FRACTAL).exists()


# ----------------------------------------------------------------------------------------------
# Resume after a failed finalize (zero_action filter, DROID-style)

ZERO_REGISTRY = """datasets:
  zrobot:
    images: {primary: image}
    language: {key: observation/natural_language_instruction}
    standardize:
      - action:
          - {key: action/world_vector}
          - {key: action/rotation_delta}
          - {key: action/gripper_closedness_action, ops: [{clip: [0, 1]}]}
    frame_filters:
      - zero_action: {q01: [0, 0, 0, 0, 0, 0], q99: [1, 1, 1, 1, 1, 1]}
"""


def _zero_steps(ep: int, t: int, rng) -> dict:
    # every fourth frame at the bottom of all six dims: normalized to -1 = the filter's normalized zero
    if (ep + t) % 4 == 0:
        return {"action": {"world_vector": np.full(3, -5, np.float32), "rotation_delta": np.full(3, -5, np.float32)}}
    return {}


def test_zero_action_dataset_resumes_after_failed_finalize(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_rlds_dataset(root, "zrobot", schema="kuka", tfds_name="zrobot", splits={"train": 5}, steps=(2, 5),
                       image_size=(12, 16), step_fn=_zero_steps)
    extra = tmp_path / "zero.yaml"
    extra.write_text(ZERO_REGISTRY)
    reg = Registry.load([extra])
    clean = tmp_path / "clean"
    assert _convert(root, clean, ["zrobot"], reg) == {}
    manifest = json.loads((clean / "zrobot" / "manifest.json").read_text())
    assert manifest["counts"]["splits"]["train"]["dropped_frames"]["zero_action"] > 0

    real_open = open

    def full_disk(path, *a, **k):  # the disk fills up while finalize writes the statistics
        if Path(path).name == ".dataset_statistics.json.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(atomic, "open", full_disk, raising=False)
    out = tmp_path / "out"
    failures = _convert(root, out, ["zrobot"], reg)
    assert "dataset_statistics.json" in failures["zrobot"] and "No space left" in failures["zrobot"]
    assert str(out) in failures["zrobot"]  # the output path, not an input shard
    monkeypatch.undo()
    assert _convert(root, out, ["zrobot"], reg) == {}  # was: FileNotFoundError .../final/images/...jpg
    assert tree(out / "zrobot") == tree(clean / "zrobot")


# ----------------------------------------------------------------------------------------------
# Damaged JPEGs and `<image>` in an instruction

BAD = {(0, 1): TRUNCATED, (1, 0): ZERO_FILLED, (2, 1): TRAILING, (3, 0): NO_PIXELS}


def _bad_steps(ep: int, t: int, rng) -> dict:
    step: dict = {}
    if (ep, t) in BAD:
        step["observation"] = {"image": BAD[(ep, t)]}
    if ep == 4:
        step.setdefault("observation", {})["natural_language_instruction"] = "put the <image> in the box"
    return step


@pytest.fixture(scope="module")
def bad_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_rlds_dataset(root, FRACTAL, splits={"train": 6}, steps=(2, 3), image_size=(12, 16), step_fn=_bad_steps)
    return root


def test_jpeg_structure_check():
    assert jpeg_structure_problem(GOOD) is None
    assert "truncated" in jpeg_structure_problem(TRUNCATED)
    assert jpeg_structure_problem(ZERO_FILLED) is not None
    assert "after the end-of-image" in jpeg_structure_problem(TRAILING)
    assert "start-of-image" in jpeg_structure_problem(b"\x89PNG....")
    assert jpeg_structure_problem(NO_PIXELS) is None and verify_decodes(NO_PIXELS) is not None
    for kw in ({"progressive": True}, {"restart_marker_blocks": 1}, {"optimize": True}):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 128).save(buf, "JPEG", **kw)
        assert jpeg_structure_problem(buf.getvalue()) is None, kw


@pytest.mark.parametrize("verify", [False, True], ids=["structure", "verify-images"])
def test_damaged_jpegs_skipped_counted_and_named(bad_source, tmp_path, verify):
    out = tmp_path / "out"
    assert _convert(bad_source, out, verify_images=verify) == {}
    m = json.loads((out / FRACTAL / "manifest.json").read_text())
    counts = {s: m["counts"]["splits"][s] for s in ("train", "val")}
    bad = [b for s in counts.values() for b in s["bad_frames"]]
    expected = {(0, 1), (1, 0), (2, 1)} | ({(3, 0)} if verify else set())
    assert sum(s["dropped_frames"].get("corrupt_image", 0) for s in counts.values()) == len(expected)
    assert sorted((int(b.split("/")[1]), int(b.split("/")[2][:4])) for b in bad) == sorted(expected)
    assert all(".tfrecord" in b and "record" in b for b in bad)  # names the shard and record
    assert any("damaged JPEG" in w for w in m["warnings"])
    samples = [json.loads(x) for s in ("train", "val") for x in (out / FRACTAL / f"{s}.jsonl").read_text().splitlines()]
    assert samples and not {(s["episode"], s["step"]) for s in samples} & expected
    for s in samples:
        assert jpeg_structure_problem((out / s["image"]).read_bytes()) is None


def test_image_token_in_instruction_rejects_the_episode(bad_source, tmp_path):
    out = tmp_path / "out"
    assert _convert(bad_source, out) == {}
    m = json.loads((out / FRACTAL / "manifest.json").read_text())
    rejected = sum(m["counts"]["splits"][s]["dropped_episodes"].get("image_token_in_instruction", 0)
                   for s in ("train", "val"))
    assert rejected == 1 and any("<image>" in w for w in m["warnings"])
    for s in ("train", "val"):
        for line in (out / FRACTAL / f"{s}.jsonl").read_text().splitlines():
            sample = json.loads(line)
            assert sample["episode"] != 4 and sample["conversations"][0]["value"].count("<image>") == 1


# ----------------------------------------------------------------------------------------------
# Output errors and relative paths (the CLI, as users run it)


@pytest.fixture(scope="module")
def small_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    _fractal(root, seed=0)
    return root


def test_unwritable_out_is_a_usage_error_naming_it(small_source, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = _run_cli("--data-dir", str(small_source), "--datasets", FRACTAL, "--out", str(blocker / "out"))
    assert r.returncode == 2 and f"--out {blocker / 'out'}" in r.stderr and "Traceback" not in r.stderr


# Above the plan file (~1.7 kB since it records each option for the rerun message), below a sample file.
LIMIT = 4000


def _file_size_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, as with ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_full_disk_names_the_output_not_the_input(small_source, tmp_path):
    out = tmp_path / "out"
    r = _run_cli("--data-dir", str(small_source), "--datasets", FRACTAL, "--out", str(out), preexec=_file_size_limit)
    assert r.returncode == 1, r.stderr
    failed = [line for line in r.stderr.splitlines() if line.startswith(f"FAILED {FRACTAL}")]
    assert failed and f"cannot write {out}" in failed[0] and "File too large" in failed[0]
    assert ".tfrecord" not in failed[0] and "Traceback" not in r.stderr
    resumed = _run_cli("--data-dir", str(small_source), "--datasets", FRACTAL, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr  # space is back: the same command finishes the job


def test_relative_data_dir_and_out(small_source, tmp_path):
    """The README's `--data-dir data/` form: relative to where the user runs the command (issue 10, defect 2)."""
    (tmp_path / "data").symlink_to(small_source, target_is_directory=True)
    r = _run_cli("--data-dir", "data/", "--datasets", FRACTAL, "--out", "converted", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "converted" / FRACTAL / "train.jsonl").is_file()
    assert (tmp_path / "converted" / "mixture.yaml").is_file()


# ----------------------------------------------------------------------------------------------
# Issue 26: what differs, said in words; a missing --data-dir is a usage error


def test_rerun_names_the_differing_option_and_reuses_an_equivalent_request(small_source, tmp_path):
    """A mixture names each dataset's version, --datasets does not: the same conversion either way (it was
    refused with a broken sentence). A real difference is named, with what to do."""
    out = tmp_path / "out"
    version = next(p.name for p in (small_source / FRACTAL).iterdir() if (p / "dataset_info.json").is_file())
    reg = Registry.load()
    assert convert(small_source, [DatasetRequest(FRACTAL, version=version)], out, reg, RunOptions(), progress=False) == {}
    manifest = (out / FRACTAL / "manifest.json").read_bytes()
    assert _convert(small_source, out) == {}  # --datasets fractal20220817_data after the mixture's run: reused
    assert (out / FRACTAL / "manifest.json").read_bytes() == manifest
    failures = convert(small_source, [DatasetRequest(FRACTAL, filter_success=True)], out, reg,
                       RunOptions(frames_per_episode=1), progress=False)
    msg = failures[FRACTAL]
    assert "mixture option filter_success: False -> True" in msg and "--frames-per-episode: None -> 1" in msg, msg
    assert "--overwrite" in msg and "registry entry" not in msg and "source data" not in msg


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_data_dir_is_a_usage_error(tmp_path, kind):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    r = _run_cli("--data-dir", str(data), "--mixture", "bridge_rt_1", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert f"--data-dir {data}: " in r.stderr and "python -m data_tools.download --mixture bridge_rt_1" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
