"""configs/vla_eval/: every config loads through vla-eval's own loader and dataclasses, names a
benchmark class that resolves, passes only parameters that class accepts, and the server command
written in its header parses (--dry-run). LIBERO/SimplerEnv themselves are not installed here."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

CONFIGS = sorted((ROOT / "configs" / "vla_eval").glob("*.yaml"))
LIBERO = ["libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90"]


def test_all_expected_configs_exist():
    names = {c.stem for c in CONFIGS}
    assert set(LIBERO) | {"simpler_google_robot", "simpler_widowx", "lift", "lift_scripted"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_with_vla_eval(path):
    from vla_eval.cli.config_loader import load_config
    from vla_eval.config import EvalConfig, ServerConfig
    from vla_eval.orchestrator import _accepted_init_params
    from vla_eval.registry import resolve_import_string

    cfg = load_config(str(path))
    assert ServerConfig.from_dict(cfg.get("server")).url.startswith("ws://127.0.0.1:")
    for entry in cfg["benchmarks"]:
        ec = EvalConfig.from_dict(entry)
        cls = resolve_import_string(ec.benchmark)
        unknown = set(ec.params) - _accepted_init_params(cls)
        assert not unknown, f"{path.name}: {cls.__name__} does not accept {unknown}"
    if path.stem in LIBERO:
        (entry,) = cfg["benchmarks"]
        assert entry["episodes_per_task"] == 50 and entry["params"]["suite"] == path.stem
        assert entry["params"]["env_seed"] == 0 and entry["params"]["seed"] == 7


@pytest.mark.parametrize("path", [c for c in CONFIGS if "llava_vla_plugin.infer.vla_eval_server" in c.read_text()],
                         ids=lambda p: p.stem)
def test_server_command_in_header_dry_runs(path, tmp_path):
    line = next(l for l in path.read_text().splitlines() if "llava_vla_plugin.infer.vla_eval_server" in l)
    argv = shlex.split(line.lstrip("# "), comments=True)
    assert argv[:3] == ["python", "-m", "llava_vla_plugin.infer.vla_eval_server"]
    # --dry-run checks the checkpoint's statistics and the key: a checkpoint as OpenVLA's data names them
    # (LIBERO's datasets are the *_no_noops versions; the header's key finds them by OpenVLA's rule)
    ckpt = tmp_path / argv[argv.index("--checkpoint") + 1]
    key = argv[argv.index("--unnorm-key") + 1] if "--unnorm-key" in argv else None  # one-dataset checkpoint
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    stats = {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}
    dataset = f"{key}_no_noops" if path.stem in LIBERO else key
    datasets = {dataset: stats, "other_dataset": stats} if key else {"lift_scripted": stats}
    (ckpt / "dataset_statistics.json").write_text(json.dumps(datasets))
    proc = subprocess.run([sys.executable, *argv[1:], "--dry-run"], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    settings = json.loads(proc.stdout)["would_serve"]
    assert settings["host"] == "127.0.0.1"
    if path.stem.startswith("simpler"):
        assert settings["gripper"] == "raw" and settings["rotation"] == "euler_to_axisangle"
        assert settings["unnorm_key"] == ("bridge_orig" if "widowx" in path.stem else "fractal20220817_data")
    elif path.stem in LIBERO:
        assert settings["gripper"] == "libero" and settings["unnorm_key"] == path.stem  # -> _no_noops fallback
        assert json.loads(proc.stdout)["unnorm_key_resolved"] == f"{path.stem}_no_noops"
