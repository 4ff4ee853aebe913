"""Bad input is caught before anything heavy loads (issue 26, item 4 and the low items): rc 2 and a message
that names the value and the fix. Every case here must fail before a model loads, so each takes seconds;
the checkpoints are a config.json and statistics only (a load would fail differently)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, subprocess_env

STATS = {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}


@pytest.fixture
def ckpt(tmp_path):
    """A two-dataset checkpoint's files that the servers read before loading weights."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "dataset_statistics.json").write_text(json.dumps({"bridge_orig": STATS, "libero_10_no_noops": STATS}))
    return d


def _server(module: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"llava_vla_plugin.{module}", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    return proc, time.perf_counter() - t0


KEYS = "['bridge_orig', 'libero_10_no_noops']"


@pytest.mark.parametrize("module", ["vla_eval_server", "serve"])
def test_servers_check_statistics_and_key_before_loading(ckpt, module):
    """The real start (no --dry-run) with a bad key fails in seconds, naming the flag and the keys; so does a
    checkpoint without dataset_statistics.json. --dry-run checks the same."""
    proc, seconds = _server(module, "--checkpoint", str(ckpt), "--unnorm-key", "nope")
    assert proc.returncode == 2, proc.stderr
    assert f"unknown --unnorm-key 'nope'; this model's statistics hold: {KEYS}" in proc.stderr and seconds < 60
    assert "Traceback" not in proc.stderr

    from llava_vla_plugin import serve, vla_eval_server

    main = {"serve": serve.main, "vla_eval_server": vla_eval_server.main}[module]
    assert main(["--checkpoint", str(ckpt), "--unnorm-key", "nope", "--dry-run"]) == 2
    assert main(["--checkpoint", str(ckpt / "missing"), "--dry-run"]) == 2
    (ckpt / "dataset_statistics.json").unlink()
    assert main(["--checkpoint", str(ckpt), "--unnorm-key", "bridge_orig", "--dry-run"]) == 2


def test_vla_eval_server_dry_run_needs_a_key_on_two_datasets(ckpt, capsys):
    from llava_vla_plugin.vla_eval_server import main

    assert main(["--checkpoint", str(ckpt), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"this model was trained on 2 datasets; pass --unnorm-key, one of: {KEYS}" in err
    assert main(["--checkpoint", str(ckpt), "--unnorm-key", "libero_10", "--dry-run"]) == 0  # OpenVLA's _no_noops rule
    assert json.loads(capsys.readouterr().out)["unnorm_key_resolved"] == "libero_10_no_noops"
    (ckpt / "dataset_statistics.json").write_text("{not json")
    assert main(["--checkpoint", str(ckpt), "--unnorm-key", "bridge_orig", "--dry-run"]) == 2
    assert "dataset_statistics.json: not valid JSON" in capsys.readouterr().err


def test_serve_key_is_per_request_unless_given(ckpt, capsys):
    """serve speaks OpenVLA's /act, whose requests carry unnorm_key: no key at start is fine; --unnorm-key is
    the default for requests without one, checked at start."""
    from llava_vla_plugin.serve import main

    assert main(["--checkpoint", str(ckpt), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["datasets"] == json.loads(KEYS.replace("'", '"')) and out["unnorm_key_resolved"] is None
    assert main(["--checkpoint", str(ckpt), "--unnorm-key", "bridge_orig", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["unnorm_key_resolved"] == "bridge_orig"


def test_policy_on_cuda_without_cuda_says_what_to_do(ckpt):
    import torch

    from llava_vla_plugin.policy import VLAPolicy

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    with pytest.raises(ValueError, match=r"device='cuda', but .*Pass device='cpu'"):
        VLAPolicy.from_pretrained(ckpt, device="cuda")
