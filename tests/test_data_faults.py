"""Bad mixture weights and sweep specs (issue 11 "Conversion" weights, "Sweeps"): rejected when the file is
read, naming the file and line; weight 0 and statistics fallbacks are visible warnings."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from data_tools.training_mixture import MixtureToolError, converted_datasets, read_weights
from data_tools.download_spec import MixtureError, load_mixture
from llava_vla_plugin.core.training_data import parse_sources

BAD_WEIGHTS = [".nan", ".inf", "-.inf", "abc", "-1", "true"]


def _download_mixture(tmp_path: Path, weight: str) -> Path:
    p = tmp_path / "mix.yaml"
    p.write_text(f"datasets:\n  - name: bridge_orig\n    weight: 1\n  - name: kuka\n    weight: {weight}\n")
    return p


def _training_mixture(tmp_path: Path, weight: str, strategy: str = "all") -> Path:
    p = tmp_path / "train_mix.yaml"
    p.write_text("datasets:\n  - json_path: a/train.jsonl\n    weight: 1\n"
                 f"  - json_path: b/train.jsonl\n    sampling_strategy: '{strategy}'\n    weight: {weight}\n")
    return p


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_bad_weight_rejected_at_parse_time_with_file_and_line(tmp_path, weight):
    path = _download_mixture(tmp_path, weight)
    with pytest.raises(MixtureError, match=rf"{path}:4: datasets\[1\] \(kuka\): weight"):
        load_mixture(path)
    with pytest.raises(MixtureToolError, match=rf"{path}:4: weight of 'kuka'"):
        read_weights(path)
    path = _training_mixture(tmp_path, weight)
    with pytest.raises(ValueError, match=rf"{path}:4: datasets\[1\] .*weight"):
        parse_sources(str(path))


def test_weight_zero_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert load_mixture(_download_mixture(tmp_path, "0")).weights["kuka"] == 0.0
        assert [s.weight for s in parse_sources(str(_training_mixture(tmp_path, "0")))] == [1.0, 0.0]
    zero = [r.getMessage() for r in caplog.records if "is 0" in r.getMessage()]
    assert len(zero) == 2 and all(":4: datasets[1]" in m for m in zero)


def test_bad_sampling_strategy_names_file_and_line(tmp_path):
    path = _training_mixture(tmp_path, "1", strategy="firsst:10")
    with pytest.raises(ValueError, match=rf"{path}:4: datasets\[1\].*unknown sampling_strategy 'firsst:10'"):
        parse_sources(str(path))
    assert [s.sampling_strategy for s in parse_sources(str(_training_mixture(tmp_path, "1", "random:10%")))][1] == \
        "random:10%"


def test_balancing_without_statistics_warns(tmp_path, caplog):
    ds = tmp_path / "conv" / "kuka"
    ds.mkdir(parents=True)
    (ds / "train.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    (ds / "dataset_statistics.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        got = converted_datasets(tmp_path / "conv")["kuka"]
    assert got.num_transitions == 2
    assert any("dataset_statistics.json" in r.getMessage() and "train frames" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Sweeps: nothing from the spec becomes a shell command


def _sweep_spec(tmp_path: Path, env: dict, script: Path) -> Path:
    import yaml

    from test_mixture_tool import _write_converted

    spec = {"name": "inject\ntouch x", "converted": str(_write_converted(tmp_path / "converted")), "env": env,
            "finetune_script": str(script), "val_data": None,
            "grid": {"fraction": 1.0, "mixture": [{"name": "b", "weights": {"bridge_orig": 1}}],
                     "model": [{"name": "tiny", "path": str(tmp_path / "model")}], "steps": 1}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run_sweep(*args, env=None) -> subprocess.CompletedProcess:
    import sys

    from conftest import ROOT, subprocess_env

    return subprocess.run([sys.executable, "-m", "llava_vla_plugin.experiments.sweep", *map(str, args)], cwd=ROOT,
                          env=subprocess_env(env), capture_output=True, text=True, timeout=120)


def test_sweep_env_key_injection_refused(tmp_path):
    marker = tmp_path / "pwned"
    spec = _sweep_spec(tmp_path, {f"X=1; touch {marker}; Y": "v"}, tmp_path / "stub.sh")
    p = _run_sweep(spec, "-o", tmp_path / "runs")
    assert p.returncode != 0 and "env names must be shell variable names" in p.stderr and "X=1; touch" in p.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("launch.sh"))
    assert not marker.exists()


def test_sweep_values_and_script_path_are_quoted(tmp_path):
    from conftest import ROOT

    odd = tmp_path / "scripts; touch pwned; $(touch pwned)"
    odd.mkdir()
    script = odd / "stub.sh"
    script.write_text('#!/usr/bin/env bash\nset -eu\nprintf "%s" "$ODD" > "$OUTPUT_DIR/odd.txt"\n'
                      "echo '{\"step\": 1}' > \"$OUTPUT_DIR/final_metrics.json\"\n")
    value = "$(touch pwned); `touch pwned` ' \" ;"
    spec = _sweep_spec(tmp_path, {"ODD": value, "NUM_GPUS": 0}, script)
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_SCRIPT"}
    p = _run_sweep(spec, "-o", tmp_path / "runs", "--launch", env=env)
    assert p.returncode == 0, p.stderr
    (run,) = [d for d in (tmp_path / "runs").iterdir() if d.is_dir()]
    assert (run / "out" / "odd.txt").read_text() == value  # arrived literally
    assert shlex.quote(str(script)) in (run / "launch.sh").read_text()
    assert not [p for p in [*tmp_path.rglob("pwned"), ROOT / "pwned"] if p.is_file()]
