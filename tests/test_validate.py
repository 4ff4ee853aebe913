"""data_tools.validate and data_tools.stats on a converted fixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llava_vla_plugin.apps.rlds_fixture import write_rlds_dataset

ROOT = Path(__file__).resolve().parents[1]


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from data_tools.convert import DatasetRequest, RunOptions, convert
    from data_tools.registry import Registry

    root = tmp_path_factory.mktemp("rlds")
    write_rlds_dataset(root, "kuka", splits={"train": 6}, steps=(2, 4), image_size=(12, 16))
    write_rlds_dataset(root, "language_table", splits={"train": 6}, steps=(2, 4), image_size=(12, 16))
    out = tmp_path_factory.mktemp("out")
    assert convert(root, [DatasetRequest("kuka"), DatasetRequest("language_table")], out, Registry.load(),
                   RunOptions(), progress=False) == {}
    return out


@pytest.fixture
def copy(converted, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(converted, dst)
    return dst


def test_valid_output_passes(converted):
    r = run_tool("data_tools.validate", str(converted))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK:" in r.stdout


def test_deleted_image_is_caught(copy):
    first = json.loads((copy / "kuka" / "train.jsonl").read_text().splitlines()[0])
    (copy / first["image"]).unlink()
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1
    assert "[images]" in r.stdout and first["image"] in r.stdout


def test_corrupt_image_is_caught(copy):
    first = json.loads((copy / "kuka" / "train.jsonl").read_text().splitlines()[0])
    (copy / first["image"]).write_bytes(b"\xff\xd8\xff garbage")
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1 and "does not decode" in r.stdout


def test_sample_without_image_token_is_caught(copy):
    path = copy / "language_table" / "train.jsonl"
    lines = path.read_text().splitlines()
    s = json.loads(lines[1])
    s["conversations"][0]["value"] = s["conversations"][0]["value"].replace("<image>\n", "")
    lines[1] = json.dumps(s)
    path.write_text("\n".join(lines) + "\n")
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1
    assert "[image_token]" in r.stdout and "language_table/train.jsonl:2" in r.stdout


def test_bad_action_and_count_mismatch_are_caught(copy):
    path = copy / "kuka" / "train.jsonl"
    lines = path.read_text().splitlines()
    s = json.loads(lines[0])
    s["conversations"][1]["value"] = [0.0] * 6
    lines[0] = json.dumps(s)
    path.write_text("\n".join(lines[:-1]) + "\n")  # and drop the last sample
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1
    assert "[action]" in r.stdout and "[counts]" in r.stdout


def test_missing_statistics_caught(copy):
    (copy / "kuka" / "dataset_statistics.json").unlink()
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1 and "[statistics]" in r.stdout


def test_not_a_converted_dir(tmp_path):
    assert run_tool("data_tools.validate", str(tmp_path)).returncode == 2


def test_stats_table_and_plots(converted, tmp_path):
    r = run_tool("data_tools.stats", str(converted), "--plot", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert "| kuka | train |" in r.stdout
    assert (tmp_path / "plots" / "kuka_actions.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "table.md").is_file()


def test_truncated_line_is_reported_and_not_counted(copy):
    """Issue 26: a truncated line was reported and still counted among the samples."""
    path = copy / "kuka" / "train.jsonl"
    lines = path.read_text().splitlines()
    n = len(lines)
    lines[1] = lines[1][: len(lines[1]) // 2]  # a line cut short (a full disk, a killed copy)
    path.write_text("\n".join(lines) + "\n")
    r = run_tool("data_tools.validate", str(copy))
    assert r.returncode == 1
    assert "[json]" in r.stdout and "kuka/train.jsonl:2: not a sample: the line is not valid JSON" in r.stdout
    assert "convert kuka again with --overwrite, or remove the line" in r.stdout
    assert f"kuka: train {n - 1} samples" in r.stdout  # the broken line is not a sample
    assert f"kuka/train: {n - 1} samples, manifest says {n}" in r.stdout
