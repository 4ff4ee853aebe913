"""`python -m llava_vla_plugin.train.fit_fast`: the FAST tokenizer fitted on a converted mixture's training windows.

Data: tests/fixtures/converted_v1 (the converter's own output, 2 datasets, 3-step episodes) for the CLI as a
subprocess, and a mixture of longer smooth episodes written with the converted format's own writers
(ConvertedSample, EpisodeActions) for compression at H = 8.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_py
from data_tools.converted_format import ConvertedSample, EpisodeActions, episode_actions_file
from llava_vla_plugin.core.chunk_data import WindowSource
from llava_vla_plugin.core.fast_codec import FILE_NAME, FastCodec, round_trip_bound
from llava_vla_plugin.core.training_data import load_data
from llava_vla_plugin.train.fit_fast import REPORT_FILE, main

FIXTURE = ROOT / "tests" / "fixtures" / "converted_v1"
MODULE = "llava_vla_plugin.train.fit_fast"


def _mixture(folder: Path, entries: list[tuple[str, float]]) -> Path:
    lines = ["datasets:"] + [f"  - json_path: {p}\n    weight: {w}" for p, w in entries]
    path = folder / "mixture.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def converted_v1(tmp_path) -> Path:
    """A copy of the fixture with its mixture.yaml (left out of the fixture: it held absolute paths)."""
    conv = tmp_path / "converted"
    shutil.copytree(FIXTURE, conv)
    return _mixture(conv, [("bridge_orig/train.jsonl", 1), ("fractal20220817_data/train.jsonl", 1)])


def _smooth_dataset(root: Path, name: str, episodes: int, steps: int, seed: int) -> None:
    """A converted dataset folder of smooth normalized episodes (train split), through the format's writers."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    seqs, lines = {}, []
    for e in range(episodes):
        t = np.linspace(0, 1, steps)[:, None]
        acts = np.clip(0.6 * np.sin(2 * np.pi * (rng.uniform(0.2, 0.8, 7) * t + rng.uniform(0, 1, 7))), -1, 1)
        acts[:, 6] = (t[:, 0] > rng.uniform(0.3, 0.7)).astype(float)  # a gripper that closes once
        acts = acts.astype(np.float32)
        seqs[e] = (acts, np.arange(steps))
        for s in range(steps):
            lines.append(ConvertedSample(name, "train", e, s, "pick up the block", list(acts[s]),
                                         list(acts[s])).to_json_line())
    (folder / "train.jsonl").write_text("".join(lines))
    EpisodeActions.from_episodes(seqs, [False] * 6 + [True]).save(folder / episode_actions_file("train"))


@pytest.fixture(scope="module")
def smooth_mixture(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("smooth")
    _smooth_dataset(root, "alpha", episodes=12, steps=30, seed=1)
    _smooth_dataset(root, "beta", episodes=8, steps=25, seed=2)
    return _mixture(root, [("alpha/train.jsonl", 1), ("beta/train.jsonl", 1)])


def test_help():
    proc = run_py(["-m", MODULE, "--help"])
    assert proc.returncode == 0, proc.stderr
    for flag in ("--data_path", "--horizon", "--vocab_size", "--out", "--seed", "--window_mode", "--no-progress"):
        assert flag in proc.stdout


def test_cli_on_converted_fixture(converted_v1, tmp_path):
    out = tmp_path / "fast"
    args = ["-m", MODULE, "--data_path", str(converted_v1), "--horizon", "4", "--window_mode", "openvla",
            "--out", str(out), "--no-progress"]
    proc = run_py(args)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {(out / FILE_NAME).resolve()}" in proc.stdout and "fractal20220817_data" in proc.stdout
    report = json.loads((out / REPORT_FILE).read_text())
    codec = FastCodec.load(out)
    assert (codec.config.horizon, codec.config.action_dim) == (4, 7)
    # the report's numbers are the saved codec's on the mixture's windows (cut here with WindowSource directly)
    store, _ = load_data(str(converted_v1))
    source = WindowSource(4, "openvla")
    by_dataset: dict[str, list[int]] = {}
    for sample in store:
        by_dataset.setdefault(sample["dataset"], []).append(len(codec.encode(source.window(sample))))
    assert {k: len(v) for k, v in by_dataset.items()} == {"bridge_orig": 2, "fractal20220817_data": 6}
    assert report["windows"] == 8 and report["bins_tokens_per_chunk"] == 28
    for name, counts in by_dataset.items():
        d = report["datasets"][name]
        assert d["windows"] == len(counts)
        assert d["tokens_per_chunk"]["mean"] == pytest.approx(np.mean(counts))
        assert d["tokens_per_chunk"]["max"] == max(counts)
        assert 0 < d["round_trip_abs_error"]["mean"] <= d["round_trip_abs_error"]["max"]
        assert d["round_trip_abs_error"]["max"] <= round_trip_bound(4, 10.0).max_abs + 1e-6
    assert report["invalid_round_trips"] == 0 and report["clipped_coefficients"] == 0
    # determinism: the same command writes the same bytes
    again = tmp_path / "again"
    assert run_py(args[:-3] + ["--out", str(again), "--no-progress"]).returncode == 0
    assert (again / FILE_NAME).read_bytes() == (out / FILE_NAME).read_bytes()
    assert (again / REPORT_FILE).read_bytes() == (out / REPORT_FILE).read_bytes()


def test_compression_on_smooth_chunks(smooth_mixture, tmp_path, capsys):
    assert main(["--data_path", str(smooth_mixture), "--horizon", "8", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    # oft: each episode gives steps - 7 windows
    assert {k: v["windows"] for k, v in report["datasets"].items()} == {"alpha": 12 * 23, "beta": 8 * 18}
    t = report["tokens_per_chunk"]
    assert t["max"] < 56 and report["compression_vs_bins"] > 2, t  # far fewer tokens than H x D bins
    assert t["mean"] <= t["p95"] <= t["max"] and report["invalid_round_trips"] == 0
    assert max(d["round_trip_abs_error"]["max"] for d in report["datasets"].values()) <= \
        report["round_trip_bound"]["max_abs"] + 1e-6
    assert "tokens per chunk" in capsys.readouterr().out


def test_max_windows_subset_and_weights(smooth_mixture, tmp_path):
    assert main(["--data_path", str(smooth_mixture), "--out", str(tmp_path / "a"), "--max_windows", "50",
                 "--seed", "3", "--no-progress"]) == 0
    report = json.loads((tmp_path / "a" / REPORT_FILE).read_text())
    assert report["windows"] == 50 and FastCodec.load(tmp_path / "a").fit_info["windows"] == 50
    # a weight of 2 doubles that dataset's windows (its copies are how often training sees them)
    text = smooth_mixture.read_text().replace("weight: 1\n  - json_path: beta", "weight: 2\n  - json_path: beta", 1)
    doubled = smooth_mixture.with_name("doubled.yaml")
    doubled.write_text(text)
    assert main(["--data_path", str(doubled), "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    windows = json.loads((tmp_path / "b" / REPORT_FILE).read_text())["datasets"]
    assert windows["alpha"]["windows"] == 2 * 12 * 23 and windows["beta"]["windows"] == 8 * 18


def _run_bad(args: list[str]) -> str:
    proc = run_py(["-m", MODULE, *args, "--no-progress"])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    return proc.stderr


def test_bad_input_exits_2_naming_the_file(converted_v1, tmp_path):
    missing = tmp_path / "nope.yaml"
    err = _run_bad(["--data_path", str(missing), "--out", str(tmp_path / "o")])
    assert f"{missing} does not exist" in err and "mixture.yaml" in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("datasets: []\n")
    assert f"{empty}" in _run_bad(["--data_path", str(empty), "--out", str(tmp_path / "o")])
    # 3-step episodes have no 8-step window under the oft rule
    err = _run_bad(["--data_path", str(converted_v1), "--out", str(tmp_path / "o")])
    assert f"{converted_v1}: no training window with --horizon 8" in err and "--window_mode openvla" in err
    # a vocabulary smaller than the coefficient range
    err = _run_bad(["--data_path", str(converted_v1), "--horizon", "2", "--vocab_size", "3", "--out", str(tmp_path / "o")])
    assert f"{converted_v1}: vocab_size 3 is too small" in err
    # converted without the per-episode action files
    npz = converted_v1.parent / "fractal20220817_data" / episode_actions_file("train")
    npz.unlink()
    err = _run_bad(["--data_path", str(converted_v1), "--horizon", "2", "--out", str(tmp_path / "o")])
    assert f"{npz} does not exist" in err and "Re-convert" in err
    assert "--horizon must be >= 1" in _run_bad(["--data_path", str(converted_v1), "--horizon", "0",
                                                 "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def _readme_fast_block() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- readme-fast: begin")[1].split("<!-- readme-fast: end -->")[0]
    return block


def test_readme_command_runs_verbatim(smooth_mixture, tmp_path):
    import shlex

    block = _readme_fast_block()
    commands = [line for line in block.splitlines() if line.startswith("python -m")]
    assert len(commands) == 1
    argv = shlex.split(commands[0])
    assert argv[:3] == ["python", "-m", MODULE]
    shutil.copytree(smooth_mixture.parent, tmp_path / "converted")  # the README's converted/mixture.yaml
    proc = run_py(argv[1:], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert FastCodec.load(tmp_path / "fast_tokenizer").config.horizon == 8
    # the bound the README quotes
    readme = " ".join((ROOT / "README.md").read_text().split())  # line breaks as spaces
    assert f"at most {round_trip_bound(8, 10.0).max_abs:.3f} in normalized units for H = 8" in readme


def test_console_command_points_at_main():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["vla-fit-fast"].split(":")
    assert getattr(importlib.import_module(module), func) is main
