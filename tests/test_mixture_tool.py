"""data_tools.training_mixture (`python -m data_tools.mixture`): relative weights (+ OpenVLA's balancing) and a data fraction -> a training mixture."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, subprocess_env
from data_tools.training_mixture import MixtureToolError, effective_frames, plan_mixture, read_weights, write_training_mixture
from llava_vla_plugin.core.training_data import load_data

# name -> (train frames, num_transitions in dataset_statistics.json)
DATASETS = {"bridge_orig": (40, 400), "fractal20220817_data": (20, 100), "tiny_set": (10, 10)}


def _write_converted(out: Path, datasets=DATASETS) -> Path:
    for name, (frames, transitions) in datasets.items():
        d = out / name
        d.mkdir(parents=True)
        lines = [json.dumps({"id": f"{name}/train/{i:06d}/0000", "image": f"{name}/images/{i}.jpg", "dataset": name,
                             "conversations": [{"from": "human", "value": "<image>\nWhat action?"},
                                               {"from": "gpt", "value": [0.0] * 7}]}) for i in range(frames)]
        (d / "train.jsonl").write_text("\n".join(lines) + "\n")
        (d / "val.jsonl").write_text(lines[0] + "\n")
        (d / "dataset_statistics.json").write_text(json.dumps({name: {"num_transitions": transitions, "num_trajectories": 3}}))
    return out


@pytest.fixture()
def converted(tmp_path):
    return _write_converted(tmp_path / "converted")


def _rows(plan):
    return {r.name: r for r in plan.rows}


def test_shares_from_weights_alone(converted):
    plan = plan_mixture(converted, {"bridge_orig": 3, "fractal20220817_data": 1}, weighting="weights")
    rows = _rows(plan)
    assert rows["bridge_orig"].share == pytest.approx(0.75) and rows["fractal20220817_data"].share == pytest.approx(0.25)
    # fraction 1: total effective frames = total train frames of the mixture's datasets (60), split 3:1
    assert plan.total_frames == 60
    assert rows["bridge_orig"].effective_frames == 45 and rows["fractal20220817_data"].effective_frames == 15
    assert rows["bridge_orig"].weight == pytest.approx(45 / 40) and rows["fractal20220817_data"].weight == pytest.approx(15 / 20)


def test_balance_multiplies_by_num_transitions(converted):
    plan = plan_mixture(converted, {"bridge_orig": 1, "fractal20220817_data": 2}, balance=True)
    rows = _rows(plan)
    # OpenVLA: share ~ w * num_transitions = 400 : 200
    assert rows["bridge_orig"].share == pytest.approx(400 / 600)
    assert rows["fractal20220817_data"].share == pytest.approx(200 / 600)
    assert rows["bridge_orig"].num_transitions == 400
    assert rows["bridge_orig"].effective_frames == 40 and rows["fractal20220817_data"].effective_frames == 20


def test_fraction_scales_total_and_keeps_shares(converted):
    weights = {"bridge_orig": 1, "fractal20220817_data": 1, "tiny_set": 2}
    full = plan_mixture(converted, weights)
    assert full.weighting == "balanced"  # the default: OpenVLA's
    quarter = plan_mixture(converted, weights, fraction=0.25)
    assert full.effective_total == 70 and quarter.effective_total == round(0.25 * 70)
    for a, b in zip(full.rows, quarter.rows):
        assert a.share == b.share
        # integer frames closest to the share (largest remainders), so the total is exact
        assert abs(b.effective_frames - b.share * 0.25 * 70) < 1
        assert b.weight == pytest.approx(b.effective_frames / b.frames)
    # fraction > 1 upsamples
    double = plan_mixture(converted, weights, fraction=2.0)
    assert double.effective_total == 140


def test_temperature_shares_on_numbers(converted):
    """(w * n) ** alpha, normalized: pi0's alpha 0.43 by default; alpha 1 is OpenVLA's balanced share, alpha 0
    gives each dataset the same share. DATASETS: n = 400, 100, 10; weights 1, 2, 1 -> w * n = 400, 200, 10."""
    from data_tools.training_mixture import mixture_shares

    weights = {"bridge_orig": 1, "fractal20220817_data": 2, "tiny_set": 1}
    shares = lambda **kw: {r.name: r.share for r in plan_mixture(converted, weights, **kw).rows}  # noqa: E731
    pi0 = shares(weighting="temperature")
    mass = {"bridge_orig": 400 ** 0.43, "fractal20220817_data": 200 ** 0.43, "tiny_set": 10 ** 0.43}
    assert pi0 == pytest.approx({n: m / sum(mass.values()) for n, m in mass.items()})
    assert pi0["tiny_set"] == pytest.approx(2.6915 / (13.1557 + 9.7590 + 2.6915), abs=1e-4)  # ~0.105 vs balanced 0.016
    assert shares(weighting="temperature", alpha=1.0) == pytest.approx(shares(weighting="balanced"))
    assert shares(weighting="temperature", alpha=1.0) == pytest.approx({"bridge_orig": 400 / 610, "fractal20220817_data": 200 / 610,
                                                                        "tiny_set": 10 / 610})
    assert shares(weighting="temperature", alpha=0.0) == pytest.approx({n: 1 / 3 for n in weights})
    # the kept-frames rule: w x train frames (40, 20, 10) -> 40 : 40 : 10
    assert shares(weighting="kept_frames") == pytest.approx({"bridge_orig": 4 / 9, "fractal20220817_data": 4 / 9, "tiny_set": 1 / 9})
    # the one formula, called directly, agrees with the planner
    assert mixture_shares(weights, {"bridge_orig": 400, "fractal20220817_data": 100, "tiny_set": 10},
                          {"bridge_orig": 40, "fractal20220817_data": 20, "tiny_set": 10}, "temperature", 0.43) == pytest.approx(pi0)
    plan = plan_mixture(converted, weights, weighting="temperature", alpha=0.5)
    assert plan.to_dict()["weighting"] == "temperature" and plan.to_dict()["temperature_alpha"] == 0.5
    with pytest.raises(MixtureToolError, match="alpha"):
        plan_mixture(converted, weights, weighting="temperature", alpha=-1)
    with pytest.raises(MixtureToolError, match="alpha"):
        plan_mixture(converted, weights, weighting="balanced", alpha=0.5)
    with pytest.raises(MixtureToolError, match="unknown weighting 'nope'"):
        plan_mixture(converted, weights, weighting="nope")
    with pytest.raises(MixtureToolError, match="contradicts"):
        plan_mixture(converted, weights, balance=True, weighting="weights")


def test_written_mixture_is_read_by_the_trainer_with_those_frames(converted, tmp_path):
    plan = plan_mixture(converted, {"bridge_orig": 1, "fractal20220817_data": 1, "tiny_set": 1}, fraction=0.5, balance=True)
    path = write_training_mixture(plan, tmp_path / "mix.yaml")
    spec = yaml.safe_load(path.read_text())
    assert all(Path(d["json_path"]).is_absolute() and d["sampling_strategy"] == "all" for d in spec["datasets"])
    samples, sources = load_data(str(path), seed=3)
    counts = {}
    for s in samples:
        counts[s["dataset"]] = counts.get(s["dataset"], 0) + 1
    assert counts == {r.name: r.effective_frames for r in plan.rows}
    assert len(samples) == plan.effective_total == 35
    # shares of what the trainer reads follow the balanced shares (400:100:10)
    assert counts["bridge_orig"] / len(samples) == pytest.approx(400 / 510, abs=0.02)
    assert spec["vla_mixture"]["balance"] is True and spec["vla_mixture"]["fraction"] == 0.5
    assert spec["vla_mixture"]["weighting"] == "balanced"


def test_effective_frames_matches_reader_rule():
    for n, w in [(10, 0.25), (7, 1.5), (3, 2.0), (40, 0.0125)]:
        assert effective_frames(n, w) == math.floor(w) * n + round((w - math.floor(w)) * n)


def test_weights_file_formats(converted, tmp_path):
    plain = tmp_path / "w.yaml"
    plain.write_text("bridge_orig: 2\nfractal20220817_data: 1\n")
    assert read_weights(plain)[1] == {"bridge_orig": 2.0, "fractal20220817_data": 1.0}
    download = tmp_path / "d.yaml"
    download.write_text("name: x\ndatasets:\n  - name: bridge_orig\n    fraction: 0.5\n    weight: 2\n  - fractal20220817_data\n")
    assert read_weights(download)[1] == {"bridge_orig": 2.0, "fractal20220817_data": 1.0}
    training = tmp_path / "t.yaml"
    training.write_text(yaml.safe_dump({"datasets": [{"json_path": str(converted / "tiny_set/train.jsonl"), "weight": 0.5}]}))
    assert read_weights(training)[1] == {"tiny_set": 0.5}
    label, preset = read_weights(preset="bridge_rt_1")
    assert label == "bridge_rt_1" and preset == {"bridge_orig": 1.0, "fractal20220817_data": 1.0}


def test_errors(converted, tmp_path):
    with pytest.raises(MixtureToolError) as e:
        plan_mixture(converted, {"bridge_orig": 1, "kuka": 1, "taco_play": 2})
    msg = str(e.value)
    assert "kuka" in msg and "taco_play" in msg and "bridge_orig, fractal20220817_data, tiny_set" in msg
    with pytest.raises(MixtureToolError, match="fraction"):
        plan_mixture(converted, {"bridge_orig": 1}, fraction=0)
    with pytest.raises(MixtureToolError, match=">= 0"):
        plan_mixture(converted, {"bridge_orig": -1})
    with pytest.raises(MixtureToolError, match="every weight is 0"):
        plan_mixture(converted, {"bridge_orig": 0})
    with pytest.raises(MixtureToolError, match="unknown preset"):
        read_weights(preset="no_such_mix")
    with pytest.raises(MixtureToolError, match="not a directory"):
        plan_mixture(tmp_path / "nope", {"bridge_orig": 1})
    # a zero weight excludes a dataset (and says so)
    plan = plan_mixture(converted, {"bridge_orig": 1, "tiny_set": 0})
    assert [r.name for r in plan.rows] == ["bridge_orig"] and plan.excluded == {"tiny_set": "weight 0"}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_tools.mixture", *args], env=subprocess_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli(converted, tmp_path):
    weights = tmp_path / "w.yaml"
    weights.write_text("bridge_orig: 1\nfractal20220817_data: 1\n")
    out = tmp_path / "mix.yaml"
    p = _cli("--converted", str(converted), "--weights", str(weights), "--fraction", "0.5", "--balance", "--seed", "7", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "eff.frames" in p.stdout and "bridge_orig" in p.stdout and "TOTAL" in p.stdout
    spec = yaml.safe_load(out.read_text())
    assert spec["vla_mixture"]["seed"] == 7 and spec["vla_mixture"]["effective_frames"] == 30
    shares = {d["name"]: d["share"] for d in spec["vla_mixture"]["datasets"]}
    assert shares == pytest.approx({"bridge_orig": 0.8, "fractal20220817_data": 0.2})
    p = _cli("--converted", str(converted), "--preset", "rtx", "-o", str(tmp_path / "x.yaml"))
    assert p.returncode == 2 and "not converted" in p.stderr and "Converted datasets there" in p.stderr
    assert not (tmp_path / "x.yaml").exists()
    assert np.isclose(sum(shares.values()), 1.0)
    # the default is the balanced rule (no --balance needed); --weighting temperature --alpha on the command line
    p = _cli("--converted", str(converted), "--weights", str(weights), "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert yaml.safe_load(out.read_text())["vla_mixture"]["weighting"] == "balanced" and "balanced (OpenVLA" in p.stdout
    p = _cli("--converted", str(converted), "--weights", str(weights), "--weighting", "temperature", "--alpha", "0", "-o", str(out))
    assert p.returncode == 0, p.stderr
    spec = yaml.safe_load(out.read_text())["vla_mixture"]
    assert spec["weighting"] == "temperature" and {d["name"]: d["share"] for d in spec["datasets"]} == pytest.approx(
        {"bridge_orig": 0.5, "fractal20220817_data": 0.5})
    p = _cli("--converted", str(converted), "--weights", str(weights), "--alpha", "0.4", "-o", str(out))
    assert p.returncode == 2 and "--alpha" in p.stderr


def test_balanced_share_uses_the_full_dataset_size_after_a_fractional_download(converted, tmp_path):
    """OpenVLA balances by the full dataset's num_transitions. A dataset downloaded at 10 % (data_tools.download
    --fraction; download_manifest.json beside its source) has statistics over 10 % of its transitions: the planner
    scales them by total / downloaded episodes, so its share is the full dataset's; published statistics
    (convert --stats-from) are already full and are not scaled."""
    src = tmp_path / "src" / "fractal"
    src.mkdir(parents=True)
    (src / "download_manifest.json").write_text(json.dumps({"fraction": 0.1, "splits": {
        "train": {"total_episodes": 300, "episodes": 30}, "val": {"total_episodes": 20, "episodes": 0}}}))
    manifest = converted / "fractal20220817_data" / "manifest.json"
    manifest.write_text(json.dumps({"source": {"data_dir": str(src)}, "statistics": "computed over split=\"all\""}))
    weights = {"bridge_orig": 1, "fractal20220817_data": 1}
    rows = _rows(plan_mixture(converted, weights))
    assert rows["fractal20220817_data"].num_transitions == 1000  # 100 transitions in 30 of 300 episodes
    assert rows["fractal20220817_data"].share == pytest.approx(1000 / 1400)
    manifest.write_text(json.dumps({"source": {"data_dir": str(src)}, "statistics": "--stats-from published.json"}))
    assert _rows(plan_mixture(converted, weights))["fractal20220817_data"].num_transitions == 100
